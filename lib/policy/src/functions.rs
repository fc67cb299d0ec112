//! Built-in functions that do more than read, by class, from PostgreSQL's
//! own catalogs (`functions.tsv`, derived by `catalog/derive.sh`, which
//! names the versions it read).

use std::collections::HashMap;
use std::sync::LazyLock;

use crate::doc::Kind;

/// What a built-in function does beyond a pure read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Signalling backends, server and WAL administration.
    Admin,
    /// Server files and programs, raw pages and WAL records.
    File,
    LargeObject,
    Sequence,
    Notify,
    AdvisoryLock,
    /// Replication slots and origins, WAL messages.
    Replication,
    /// `set_config`.
    Config,
    /// Statistics resets and planner-statistics writes.
    StatsReset,
    /// dblink and foreign-data connections.
    Remote,
    /// Runs a query given as text (`query_to_xml`, `ts_stat`).
    DynamicSql,
}

impl Class {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "admin" => Class::Admin,
            "file" => Class::File,
            "large_object" => Class::LargeObject,
            "sequence" => Class::Sequence,
            "notify" => Class::Notify,
            "advisory_lock" => Class::AdvisoryLock,
            "replication" => Class::Replication,
            "config" => Class::Config,
            "stats_reset" => Class::StatsReset,
            "remote" => Class::Remote,
            "dynamic_sql" => Class::DynamicSql,
            _ => return None,
        })
    }

    /// The kind a call gives its statement.
    pub fn kind(self) -> Kind {
        match self {
            Class::Admin | Class::File | Class::Replication | Class::Remote => Kind::Server,
            Class::LargeObject | Class::Sequence => Kind::Write,
            Class::Notify | Class::StatsReset => Kind::Utility,
            Class::AdvisoryLock => Kind::Lock,
            Class::Config => Kind::Config,
            Class::DynamicSql => Kind::Procedural,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Admin => "server administration",
            Class::File => "server file access",
            Class::LargeObject => "large-object write",
            Class::Sequence => "sequence change",
            Class::Notify => "notification",
            Class::AdvisoryLock => "advisory lock",
            Class::Replication => "replication",
            Class::Config => "configuration",
            Class::StatsReset => "statistics reset",
            Class::Remote => "remote connection",
            Class::DynamicSql => "query run from text",
        }
    }
}

/// Every built-in function name (pg_catalog and contrib), with its class
/// when it has effects.
static BUILTIN: LazyLock<HashMap<&'static str, Option<Class>>> = LazyLock::new(|| {
    include_str!("functions.tsv")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('\t'))
        .map(|(name, class)| (name, Class::parse(class)))
        .collect()
});

/// `Some(class)` for a built-in with effects, `Some(None)` for a built-in
/// pure read, `None` when PostgreSQL has no built-in of that name.
pub fn builtin(name: &str) -> Option<Option<Class>> {
    BUILTIN.get(name).copied()
}
