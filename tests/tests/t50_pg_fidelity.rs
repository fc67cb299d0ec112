//! PostgreSQL protocol fidelity through the whole path (client → server →
//! QUIC → agent → PostgreSQL): real clients, each compared with the same run
//! directly against PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gatehouse_e2e::tpg::RustlsConnect;
use gatehouse_e2e::*;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::{AsyncMessage, Client, Connection, Notification};

fn text(o: &Output) -> String {
    format!(
        "status={:?}\nstdout={}\nstderr={}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a psql script file (errors do not stop it), aligned output, as a
/// user would.
fn psql_file(conninfo: &str, password: &str, script: &std::path::Path) -> Output {
    Command::new("psql")
        .args(["-X", "-v", "VERBOSITY=verbose", "-f"])
        .arg(script)
        .arg(conninfo)
        .env("PGPASSWORD", password)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn gateway_conninfo(stack: &Stack, db: &str) -> String {
    target_conninfo(stack, "db", db)
}

fn target_conninfo(stack: &Stack, target: &str, db: &str) -> String {
    let (host, port) = stack.pg_addr.rsplit_once(':').unwrap();
    format!("host={host} port={port} user={target} dbname={db} sslmode=require connect_timeout=10")
}

fn direct_conninfo(stack: &Stack, db: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={AGENT_ROLE} dbname={db} sslmode=disable connect_timeout=10",
        stack.pg.port
    )
}

/// The same script through the gateway (database `app`) and directly
/// (database `direct`) must print exactly the same, byte for byte.
fn same_through_both(stack: &Stack, key: &str, name: &str, script: &str) -> String {
    let path = stack.tmp.path().join(format!("{name}.sql"));
    std::fs::write(&path, script).unwrap();
    let via = psql_file(&gateway_conninfo(stack, "app"), key, &path);
    let direct = psql_file(&direct_conninfo(stack, "direct"), AGENT_PASSWORD, &path);
    assert_eq!(
        text(&via),
        text(&direct),
        "{name}: gateway and direct differ"
    );
    String::from_utf8_lossy(&via.stdout).into_owned()
}

#[test]
fn psql_scripts_and_copy_both_ways_match_direct() {
    let (stack, key) = Stack::start();
    // A multi-statement script: transactions, savepoints, an error and
    // recovery, notices, parameter status changes, several statements in
    // one simple query, a prepared statement.
    let script = r#"
create table items (id int primary key, name text, price numeric(10,2));
begin;
insert into items values (1, 'bolt', 0.10), (2, 'nut', 0.05);
savepoint s1;
insert into items values (1, 'duplicate', 1);
rollback to savepoint s1;
insert into items values (3, 'gear', 12.50);
commit;
select 1 as a; select 2 as b; select count(*) from items;
do $$ begin raise notice 'items now %', (select count(*) from items); end $$;
set application_name = 'fidelity';
show application_name;
set datestyle = 'German';
select date '2024-03-01' as d;
prepare byid(int) as select name, price from items where id = $1;
execute byid(3);
deallocate byid;
select * from no_such_table;
select name, price from items order by id;
"#;
    let out = same_through_both(&stack, &key, "script", script);
    assert!(out.contains("gear"), "{out}");
    assert!(out.contains("01.03.2024"), "{out}");

    // \copy both ways with 100k rows.
    let csv = stack.tmp.path().join("in.csv");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&csv).unwrap());
        for i in 0..100_000 {
            writeln!(f, "{i},name-{i},\"quoted, text {i}\"").unwrap();
        }
    }
    for (conninfo, pw, out_name) in [
        (gateway_conninfo(&stack, "app"), key.as_str(), "via.csv"),
        (
            direct_conninfo(&stack, "direct"),
            AGENT_PASSWORD,
            "direct.csv",
        ),
    ] {
        let out_csv = stack.tmp.path().join(out_name);
        let script = stack.tmp.path().join(format!("{out_name}.sql"));
        std::fs::write(
            &script,
            format!(
                "\\set ON_ERROR_STOP 1\ncreate table big (id int primary key, name text, note text);\n\\copy big from '{}' csv\n\\copy (select * from big order by id) to '{}' csv\nselect count(*) from big;\n",
                csv.display(),
                out_csv.display()
            ),
        )
        .unwrap();
        let o = psql_file(&conninfo, pw, &script);
        assert!(o.status.success(), "{out_name}: {}", text(&o));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("COPY 100000"), "{stdout}");
        assert!(stdout.contains("100000"), "{stdout}");
    }
    let input = std::fs::read(&csv).unwrap();
    assert_eq!(
        std::fs::read(stack.tmp.path().join("via.csv")).unwrap(),
        input,
        "COPY TO through the gateway returns exactly what COPY FROM took in"
    );
    assert_eq!(
        std::fs::read(stack.tmp.path().join("direct.csv")).unwrap(),
        input
    );
    // Both COPYs are in the evidence with their row counts.
    let events = wait_until("copy audited", Duration::from_secs(20), || {
        let ev = stack.audit_events(&["--target", "db"]);
        let copies = ev
            .iter()
            .filter(|e| {
                e["statement"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("COPY") || s.starts_with("copy"))
            })
            .count();
        (copies >= 2).then_some(ev)
    });
    let copy_rows: Vec<u64> = events
        .iter()
        .filter(|e| {
            e["statement"]
                .as_str()
                .is_some_and(|s| s.to_lowercase().starts_with("copy"))
        })
        .map(|e| e["outcome"]["rows"].as_u64().unwrap())
        .collect();
    assert_eq!(copy_rows, vec![100_000, 100_000], "{events:#?}");
}

/// Drives a tokio-postgres connection, passing notifications on.
fn drive<S, T>(mut conn: Connection<S, T>) -> tokio::sync::mpsc::UnboundedReceiver<Notification>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    rx
}

async fn via_gateway(
    stack: &Stack,
    key: &str,
) -> (Client, tokio::sync::mpsc::UnboundedReceiver<Notification>) {
    let (host, port) = stack.pg_addr.rsplit_once(':').unwrap();
    let conf = format!("host={host} port={port} user=db password={key} dbname=app sslmode=require");
    let (c, conn) = tokio_postgres::connect(&conf, RustlsConnect::new(&stack.ca_file))
        .await
        .unwrap();
    (c, drive(conn))
}

async fn direct(stack: &Stack) -> Client {
    let conf = format!(
        "host=127.0.0.1 port={} user={AGENT_ROLE} password={AGENT_PASSWORD} dbname=direct",
        stack.pg.port
    );
    let (c, conn) = tokio_postgres::connect(&conf, tokio_postgres::NoTls)
        .await
        .unwrap();
    drive(conn);
    c
}

/// Binary parameters and results, named prepared statements, transactions
/// committed, rolled back and aborted by an error, and pipelined queries.
async fn driver_workload(c: &mut Client) -> Vec<String> {
    let mut out = Vec::new();
    c.batch_execute(
        "create table accounts (id int8 primary key, owner text not null, balance float8, active bool, photo bytea)",
    )
    .await
    .unwrap();
    let ins = c
        .prepare("insert into accounts values ($1, $2, $3, $4, $5)")
        .await
        .unwrap();
    let tx = c.transaction().await.unwrap();
    for i in 0..50i64 {
        tx.execute(
            &ins,
            &[
                &i,
                &format!("owner-{i}"),
                &(i as f64 * 1.5),
                &(i % 2 == 0),
                &vec![i as u8, 0, 255],
            ],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute(
        &ins,
        &[&1000i64, &"gone", &0.0f64, &true, &Vec::<u8>::new()],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let dup = tx
        .execute(&ins, &[&1i64, &"dup", &0.0f64, &true, &Vec::<u8>::new()])
        .await
        .unwrap_err();
    out.push(format!("dup: {:?}", dup.code().map(|c| c.code())));
    tx.rollback().await.unwrap();

    let sel = c
        .prepare("select id, owner, balance, active, photo from accounts where id >= $1 and active = $2 order by id")
        .await
        .unwrap();
    for row in c.query(&sel, &[&40i64, &true]).await.unwrap() {
        out.push(format!(
            "{:?}",
            (
                row.get::<_, i64>(0),
                row.get::<_, String>(1),
                row.get::<_, f64>(2),
                row.get::<_, bool>(3),
                row.get::<_, Vec<u8>>(4)
            )
        ));
    }
    // Pipelined: twenty queries in flight on one connection.
    let args: Vec<i32> = (0..20).collect();
    let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 2]> =
        args.iter().map(|i| [i as _, &"é" as _]).collect();
    let doubled = futures::future::try_join_all(
        params
            .iter()
            .map(|p| c.query_one("select $1::int4 * 2, $2::text", p)),
    )
    .await
    .unwrap();
    out.push(format!(
        "{:?}",
        doubled
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
            .collect::<Vec<_>>()
    ));
    let n: i64 = c
        .query_one("select count(*) from accounts", &[])
        .await
        .unwrap()
        .get(0);
    out.push(format!("count {n}"));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_binary_parameters_prepared_statements_and_transactions_match_direct() {
    let (stack, key) = tokio::task::block_in_place(Stack::start);
    let (mut gw, _n) = via_gateway(&stack, &key).await;
    let mut d = direct(&stack).await;
    let via = driver_workload(&mut gw).await;
    let direct = driver_workload(&mut d).await;
    assert_eq!(via, direct);
    assert_eq!(via.first().unwrap(), "dup: Some(\"23505\")");
    assert_eq!(via.last().unwrap(), "count 50");

    // The evidence carries the statement text from Parse and the
    // parameters, rendered as text.
    let events = tokio::task::block_in_place(|| {
        wait_until("driver statements audited", Duration::from_secs(20), || {
            let ev = stack.audit_events(&["--target", "db"]);
            ev.iter()
                .any(|e| e["statement"].as_str() == Some("select count(*) from accounts"))
                .then_some(ev)
        })
    });
    let insert = events
        .iter()
        .find(|e| {
            e["statement"].as_str() == Some("insert into accounts values ($1, $2, $3, $4, $5)")
                && e["parameters"][0].as_str() == Some("7")
        })
        .unwrap_or_else(|| panic!("no insert of id 7 in {events:#?}"));
    assert_eq!(
        insert["parameters"],
        serde_json::json!(["7", "owner-7", "10.5", "f", "\\x0700ff"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_round_trip_through_the_gateway() {
    let (stack, key) = tokio::task::block_in_place(Stack::start);
    let (listener, mut notes) = via_gateway(&stack, &key).await;
    let (notifier, _n) = via_gateway(&stack, &key).await;
    listener
        .batch_execute("listen orders_changed")
        .await
        .unwrap();
    notifier
        .batch_execute("notify orders_changed, 'order 42 shipped'")
        .await
        .unwrap();
    // Delivered while the listener is idle, without it sending anything.
    let n = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .expect("notification within 5 s")
        .unwrap();
    assert_eq!(n.channel(), "orders_changed");
    assert_eq!(n.payload(), "order 42 shipped");
    // The sender named in the notification is the notifier's own backend.
    let notifier_pid: i32 = notifier
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n.process_id(), notifier_pid);
    // pg_notify from a transaction is delivered at commit, once.
    notifier
        .batch_execute("begin; select pg_notify('orders_changed', 'a'); select pg_notify('orders_changed', 'b'); commit")
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let n = tokio::time::timeout(Duration::from_secs(5), notes.recv())
            .await
            .unwrap()
            .unwrap();
        got.push(n.payload().to_string());
    }
    assert_eq!(got, ["a", "b"]);
    listener.batch_execute("unlisten *").await.unwrap();
}

/// asyncpg, a driver of its own (not libpq): the process id it got in
/// BackendKeyData is the target's, so `pg_backend_pid()` agrees with it and
/// a notification the connection sent itself is recognised as its own.
#[test]
fn asyncpg_sees_the_targets_process_id_and_its_own_notifications() {
    let (stack, key) = Stack::start();
    let (host, port) = stack.pg_addr.rsplit_once(':').unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("drivers/asyncpg_backend_pid.py");
    // deps.sh installs asyncpg under tests/drivers/pylib.
    let o = Command::new("python3")
        .arg(&script)
        .env("PYTHONPATH", script.with_file_name("pylib"))
        .env("PGHOST", host)
        .env("PGPORT", port)
        .env("PGUSER", "db")
        .env("PGPASSWORD", &key)
        .env("PGDATABASE", "app")
        .env("PGSSLROOTCERT", &stack.ca_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {out}"))
            .to_string()
    };
    let driver_pid = field("driver_pid");
    assert_eq!(driver_pid, field("backend_pid"), "{out}");
    assert_eq!(driver_pid, field("notify_pid"), "{out}");
    assert_eq!(field("payload"), "from myself");
}

/// Waits until PostgreSQL runs `pg_sleep` for the agent's role.
fn wait_sleeping(stack: &Stack) {
    wait_until("query running upstream", Duration::from_secs(10), || {
        let n = stack
            .pg
            .psql_super(
                "postgres",
                "select count(*) from pg_stat_activity where state = 'active' and query like 'select pg_sleep%'",
            )
            .unwrap();
        (n.trim() != "0").then_some(())
    });
}

fn spawn_psql(stack: &Stack, key: &str, sql: &str) -> std::process::Child {
    spawn_psql_to(stack, "db", key, sql)
}

fn spawn_psql_to(stack: &Stack, target: &str, key: &str, sql: &str) -> std::process::Child {
    Command::new("psql")
        .args(["-X", "-v", "VERBOSITY=verbose", "-c", sql])
        .arg(target_conninfo(stack, target, "app"))
        .env("PGPASSWORD", key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn psql_cancel_returns_57014_within_a_second_and_forged_keys_do_nothing() {
    let (stack, key) = Stack::start();
    // A forged cancel key (in clear, as libpq sends it) does not touch a
    // running query.
    let (host, port) = stack.pg_addr.rsplit_once(':').unwrap();
    let sleeper = spawn_psql(&stack, &key, "select pg_sleep(1.5)");
    wait_sleeping(&stack);
    let upstream_pid: i32 = stack
        .pg
        .psql_super(
            "postgres",
            "select pid from pg_stat_activity where query like 'select pg_sleep%' limit 1",
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for (pid, secret) in [(upstream_pid, 0i32), (12345, 67890), (upstream_pid, -1)] {
        let mut s = std::net::TcpStream::connect((host, port.parse::<u16>().unwrap())).unwrap();
        let mut m = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        m.extend_from_slice(&pid.to_be_bytes());
        m.extend_from_slice(&secret.to_be_bytes());
        s.write_all(&m).unwrap();
    }
    let o = sleeper.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "forged cancel must not cancel: {}",
        text(&o)
    );

    // Ctrl-C in psql: libpq sends the key the gateway gave it.
    let (took, o) = cancel_sleep(&stack, "db", &key);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("57014") && stderr.contains("canceling statement due to user request"),
        "{}",
        text(&o)
    );
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    eprintln!("psql cancel answered in {took:?}");
    // The session survives a cancel: the same evidence as directly.
    let events = wait_until("cancel audited", Duration::from_secs(20), || {
        let ev = stack.audit_events(&["--target", "db"]);
        ev.into_iter()
            .find(|e| e["statement"] == "select pg_sleep(30)" && e["kind"] == "statement")
    });
    assert_eq!(events["outcome"]["error_code"], "57014");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_cancel_over_tls_returns_57014_within_a_second() {
    let (stack, key) = tokio::task::block_in_place(Stack::start);
    let (c, _n) = via_gateway(&stack, &key).await;
    let token = c.cancel_token();
    let tls = RustlsConnect::new(&stack.ca_file);
    let sleeper = c.simple_query("select pg_sleep(30)");
    let canceller = async {
        tokio::task::block_in_place(|| wait_sleeping(&stack));
        let t0 = Instant::now();
        token.cancel_query(tls).await.unwrap();
        t0
    };
    let (r, t0) = tokio::join!(sleeper, canceller);
    let took = t0.elapsed();
    let e = r.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    // The connection is usable afterwards.
    let one: i32 = c.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    eprintln!("driver cancel answered in {took:?}");
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_million_rows_stream_with_bounded_memory() {
    let (stack, key) = tokio::task::block_in_place(Stack::start);
    let server = stack.server.child.id();
    let agent = stack.agent.as_ref().unwrap().child.id();
    let (c, _n) = via_gateway(&stack, &key).await;
    // Warm the path so the baseline includes the session's fixed cost.
    c.simple_query("select 1").await.unwrap();
    let before = (rss_kib(server, "VmRSS:"), rss_kib(agent, "VmRSS:"));
    let rows = c
        .query_raw(
            "select generate_series(1, 2000000), repeat('x', 100)",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    let mut rows = std::pin::pin!(rows);
    let (mut n, mut bytes) = (0u64, 0usize);
    let t0 = Instant::now();
    // A client slower than the upstream, so back-pressure must hold the
    // rows in PostgreSQL, not in the gateway.
    while let Some(row) = futures::StreamExt::next(&mut rows).await {
        let row = row.unwrap();
        bytes += row.get::<_, &str>(1).len();
        n += 1;
        if n % 4000 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let took = t0.elapsed();
    assert_eq!(n, 2_000_000);
    assert_eq!(bytes, 200_000_000);
    let grew = (
        rss_kib(server, "VmHWM:").saturating_sub(before.0),
        rss_kib(agent, "VmHWM:").saturating_sub(before.1),
    );
    eprintln!(
        "2M rows in {took:?}; peak RSS growth server {} KiB, agent {} KiB",
        grew.0, grew.1
    );
    assert!(grew.0 < 64 << 10, "server RSS grew {} KiB", grew.0);
    assert!(grew.1 < 64 << 10, "agent RSS grew {} KiB", grew.1);
}

#[test]
fn gssenc_is_refused_cleanly_and_tls_still_follows() {
    let (stack, key) = Stack::start();
    let mut s = std::net::TcpStream::connect(&stack.pg_addr).unwrap();
    use std::io::Read;
    // GSSENCRequest: the gateway answers 'N' and keeps the connection.
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).unwrap();
    let mut a = [0u8; 1];
    s.read_exact(&mut a).unwrap();
    assert_eq!(a[0], b'N');
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).unwrap();
    s.read_exact(&mut a).unwrap();
    assert_eq!(a[0], b'S');
    drop(s);
    // libpq's default gssencmode=prefer still connects.
    let (host, port) = stack.pg_addr.rsplit_once(':').unwrap();
    let o = Command::new("psql")
        .args(["-X", "-A", "-t", "-c", "select 1"])
        .arg(format!(
            "host={host} port={port} user=db dbname=app sslmode=require gssencmode=prefer"
        ))
        .env("PGPASSWORD", &key)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "1",
        "{}",
        text(&o)
    );
}

/// Ctrl-C on a psql running `select pg_sleep(30)` through `target`; returns
/// how long the cancel took and psql's output.
fn cancel_sleep(stack: &Stack, target: &str, key: &str) -> (Duration, Output) {
    let child = spawn_psql_to(stack, target, key, "select pg_sleep(30)");
    wait_sleeping(stack);
    let t0 = Instant::now();
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    (t0.elapsed(), o)
}

#[test]
fn upstream_tls_modes_and_authentication_methods() {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = Stack::start_server();
    let pg = &stack.pg;
    // TLS on the target, with a certificate for 127.0.0.1 from a test CA.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ca = gatehouse_pki::ClusterCa::generate("target", now).unwrap();
    let leaf = gatehouse_pki::ClusterCa::from_pem(&ca)
        .unwrap()
        .issue_server(&["127.0.0.1".into()], now, 1)
        .unwrap();
    let other_ca = gatehouse_pki::ClusterCa::generate("someone else", now).unwrap();
    let data = pg.dir.join("data");
    for (name, body) in [
        ("server.crt", &leaf.cert_pem),
        ("server.key", &leaf.key_pem),
    ] {
        let p = data.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let _ = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&p)
            .status();
    }
    let ca_file = stack.tmp.path().join("target-ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let other_ca_file = stack.tmp.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, &other_ca.cert_pem).unwrap();
    // An MD5 role and a trusted role, first in pg_hba.conf.
    pg.psql_super(
        "postgres",
        "set password_encryption = 'md5'; create role md5user login password 'Md5-Secret-1'",
    )
    .unwrap();
    pg.psql_super("postgres", "create role trustuser login")
        .unwrap();
    pg.psql_super("app", "grant all on schema public to md5user, trustuser")
        .unwrap();
    let hba = data.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all md5user 127.0.0.1/32 md5\nhost all trustuser 127.0.0.1/32 trust\n{old}"),
    )
    .unwrap();
    pg.psql_super("postgres", "alter system set ssl = on; ")
        .unwrap();
    pg.psql_super("postgres", "select pg_reload_conf()")
        .unwrap();

    let targets: &[(&str, &str, &str)] = &[
        // name, role, extra agent config
        ("db", AGENT_ROLE, ""),
        ("db-plain", AGENT_ROLE, "sslmode = \"disable\"\n"),
        ("db-require", AGENT_ROLE, "sslmode = \"require\"\n"),
        (
            "db-verify",
            AGENT_ROLE,
            &format!(
                "sslmode = \"verify-full\"\nsslrootcert = \"{}\"\n",
                ca_file.display()
            ),
        ),
        (
            "db-wrong-ca",
            AGENT_ROLE,
            &format!(
                "sslmode = \"verify-full\"\nsslrootcert = \"{}\"\n",
                other_ca_file.display()
            ),
        ),
        (
            "db-md5",
            "md5user",
            "sslmode = \"disable\"\npassword = \"Md5-Secret-1\"\n",
        ),
        ("db-trust", "trustuser", "password = \"\"\n"),
    ];
    let key = stack.create_account("alice", &["dev"]);
    let agent_dir = stack.tmp.path().join("agent");
    let config = stack.write_agent_config("edge-1", &agent_dir);
    let mut agent_toml = std::fs::read_to_string(&config).unwrap();
    let pw = agent_dir.join("db.password");
    for (name, role, extra) in targets {
        stack.cli_ok(&[
            "targets",
            "create",
            name,
            "--agent",
            "edge-1",
            "--db-user",
            role,
        ]);
        stack.cli_ok(&["rules", "create", "--subject", "sa:alice", "--target", name]);
        if *name == "db" {
            continue;
        }
        let password = if extra.contains("password") {
            String::new()
        } else {
            format!("password_file = \"{}\"\n", pw.display())
        };
        agent_toml.push_str(&format!(
            "\n[[targets]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{role}\"\n{password}{extra}",
            stack.pg.port
        ));
    }
    std::fs::write(&config, agent_toml).unwrap();
    let token = stack.enroll_token("edge-1");
    stack.start_agent(Some(&token));
    stack.wait_agent_connected("edge-1");

    let sql = "select current_user, coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false)";
    let (host, port) = stack.pg_addr.rsplit_once(':').unwrap();
    for (target, expect) in [
        ("db", "gatehouse_agent|t"),
        ("db-plain", "gatehouse_agent|f"),
        ("db-require", "gatehouse_agent|t"),
        ("db-verify", "gatehouse_agent|t"),
        ("db-md5", "md5user|f"),
        ("db-trust", "trustuser|t"),
    ] {
        let o = psql(host, port, target, &key, "app", "require", sql);
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            expect,
            "{target}: {}",
            text(&o)
        );
    }
    let md5: String = stack
        .pg
        .psql_super(
            "postgres",
            "select left(rolpassword, 3) from pg_authid where rolname = 'md5user'",
        )
        .unwrap();
    assert_eq!(md5.trim(), "md5");
    // A certificate from another CA: the session is refused with a clear
    // error, before any credential is sent.
    let before = stack.upstream_connections();
    let o = psql(
        host,
        port,
        "db-wrong-ca",
        &key,
        "app",
        "require",
        "select 1",
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("TLS to target failed"), "{}", text(&o));
    assert_eq!(stack.upstream_connections(), before);
    // Cancel reaches a TLS-only target over TLS.
    let (took, o) = cancel_sleep(&stack, "db-verify", &key);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("57014"),
        "{}",
        text(&o)
    );
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
}
