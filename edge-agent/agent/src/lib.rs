//! `gatehouse-agent`: the edge agent's core ([`gatehouse_agent_core`],
//! re-exported here) with the protocols it serves.

pub use gatehouse_agent_core::*;

/// Every protocol this agent serves, by its target kind.
pub fn protocols() -> protocol::Protocols {
    protocol::Protocols::default()
        .with(
            "postgres",
            std::sync::Arc::new(gatehouse_agent_pg::Postgres::default()),
        )
        .with("ssh", std::sync::Arc::new(gatehouse_agent_ssh::Ssh))
}
