//! Regenerates the inspector's golden captures (`lib/pgwire-inspect/testdata`)
//! from real psql, pgbench and tokio-postgres traffic with a real
//! PostgreSQL. Ignored in the normal run; regenerate with
//! `cargo nextest run -p gatehouse-e2e --test t90_capture --run-ignored only`
//! and review the `.events` diffs the inspector tests then report.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

use gatehouse_e2e::capture::CaptureProxy;
use gatehouse_e2e::*;

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lib/pgwire-inspect/testdata")
}

const PSQL_SCRIPT: &str = r#"
create table items (id int primary key, name text, price numeric(10,2));
begin;
insert into items values (1, 'bolt', 0.10), (2, 'nut', 0.05);
savepoint s1;
insert into items values (1, 'duplicate', 1);
rollback to savepoint s1;
commit;
select 1 as a; select 2 as b; select count(*) from items;
do $$ begin raise notice 'items now %', (select count(*) from items); end $$;
set application_name = 'capture';
\copy items from stdin csv
10,washer,0.01
11,spring,0.20
12,"pin, split",0.02
\.
\copy (select * from items order by id) to stdout csv
listen items_changed;
notify items_changed, 'payload';
select 'é' || repeat('x', 3);
select * from no_such_table;
"#;

#[test]
#[ignore = "regenerates committed golden files"]
fn capture_golden_traffic() {
    let pg = LocalPostgres::start().unwrap();
    pg.create_role_and_db(AGENT_ROLE, AGENT_PASSWORD, "app")
        .unwrap();
    std::fs::create_dir_all(testdata()).unwrap();
    let proxy = CaptureProxy::start(pg.port);
    let conninfo = |port: u16| {
        format!("host=127.0.0.1 port={port} user={AGENT_ROLE} dbname=app sslmode=disable")
    };
    // One file per connection (pgbench opens one to look at the tables
    // before the one that runs the benchmark).
    let save = |name: &str| {
        let conns = proxy.take();
        assert!(!conns.is_empty(), "{name}: nothing captured");
        for (i, bytes) in conns.iter().enumerate() {
            let file = match conns.len() {
                1 => format!("{name}.pgcap"),
                _ => format!("{name}.{}.pgcap", i + 1),
            };
            std::fs::write(testdata().join(file), bytes).unwrap();
        }
    };

    // psql: a script with every kind of simple-protocol cycle.
    let script = std::env::temp_dir().join("gatehouse-capture.sql");
    std::fs::write(&script, PSQL_SCRIPT).unwrap();
    let o = Command::new("psql")
        .args(["-X", "-f"])
        .arg(&script)
        .arg(conninfo(proxy.port))
        .env("PGPASSWORD", AGENT_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.code() == Some(0), "{o:?}");
    save("psql_script");

    // pgbench: select-only in each protocol mode, and TPC-B-like prepared.
    let o = Command::new("pgbench")
        .args(["-i", "-s", "1", "-q"])
        .arg(conninfo(pg.port))
        .env("PGPASSWORD", AGENT_PASSWORD)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    for (name, args) in [
        ("pgbench_select_simple", &["-S", "-M", "simple"][..]),
        ("pgbench_select_extended", &["-S", "-M", "extended"][..]),
        ("pgbench_select_prepared", &["-S", "-M", "prepared"][..]),
        ("pgbench_tpcb_prepared", &["-M", "prepared"][..]),
    ] {
        let o = Command::new("pgbench")
            .args(["-n", "-c", "1", "-t", "8"])
            .args(args)
            .arg(conninfo(proxy.port))
            .env("PGPASSWORD", AGENT_PASSWORD)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        save(name);
    }

    // tokio-postgres: prepared statements, binary parameters, a transaction,
    // pipelining, and an error inside a pipeline.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conf = format!(
            "host=127.0.0.1 port={} user={AGENT_ROLE} password={AGENT_PASSWORD} dbname=app",
            proxy.port
        );
        let (mut c, conn) = tokio_postgres::connect(&conf, tokio_postgres::NoTls)
            .await
            .unwrap();
        let h = tokio::spawn(conn);
        c.batch_execute("create table acct (id int8 primary key, owner text, balance float8, active bool, photo bytea)")
            .await
            .unwrap();
        let ins = c
            .prepare("insert into acct values ($1, $2, $3, $4, $5)")
            .await
            .unwrap();
        let tx = c.transaction().await.unwrap();
        for i in 0..3i64 {
            tx.execute(
                &ins,
                &[&i, &format!("owner-{i}"), &(i as f64 / 2.0), &(i == 1), &vec![i as u8, 255]],
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        let none: Option<&str> = None;
        let _ = c
            .execute(&ins, &[&9i64, &none, &0.0f64, &false, &Vec::<u8>::new()])
            .await;
        let _ = c
            .execute(&ins, &[&1i64, &"dup", &0.0f64, &false, &Vec::<u8>::new()])
            .await;
        let sel = c
            .prepare("select id, owner, photo from acct where id >= $1 order by id")
            .await
            .unwrap();
        let a = c.query(&sel, &[&1i64]);
        let b = c.query_one("select $1::text || '!'", &[&"pipelined"]);
        let d = c.query("select 1/0", &[]);
        let (a, b, d) = tokio::join!(a, b, d);
        a.unwrap();
        b.unwrap();
        assert!(d.is_err());
        drop(c);
        let _ = h.await;
    });
    save("tokio_postgres");
}
