#!/usr/bin/env python3
"""PostgreSQL path benchmark: pgbench against (a) PostgreSQL directly,
(b) pgbouncer in session mode, (c) Gatehouse's full path (TLS ingress ->
server -> QUIC -> agent -> PostgreSQL, audit and recording on), interleaved
in one run on one machine.

Workloads: `-S` (select only) in simple and prepared mode, the default
TPC-B-like script (prepared), and a pipeline of 50 `SELECT 1`
(`\startpipeline`, one transaction = the whole pipeline), each at 1 and 8
clients; new connections (`-S -C`, 1 and 4 clients: a session per
transaction);
asyncpg `executemany` of 10,000 rows. Prints TPS and the ratio to direct,
added p50/p99 latency at 1 client (from pgbench's per-transaction log), the
connection time with `-C`, and the CPU time per transaction of the gateway's
processes (gatehouse server + agent; pgbouncer for (b)), read from /proc.

Run with `bash benches/pg-path.sh [seconds=10] [rounds=1]`.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

SECS = int(sys.argv[1]) if len(sys.argv) > 1 else 10
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 1
BIN = sys.argv[3] if len(sys.argv) > 3 else "target/release"
TICK = os.sysconf("SC_CLK_TCK")
PIPELINE = "\\startpipeline\n" + "SELECT 1;\n" * 50 + "\\endpipeline\n"
# (name, pgbench arguments, client counts); "{pipeline}" is the script file.
WORKLOADS = [
    ("select-only simple", ["-S", "-M", "simple"], [1, 8]),
    ("select-only prepared", ["-S", "-M", "prepared"], [1, 8]),
    ("tpc-b-like prepared", ["-M", "prepared"], [1, 8]),
    ("pipeline 50 x select 1", ["-M", "extended", "-f", "{pipeline}"], [1, 8]),
    ("new connections -S -C", ["-S", "-M", "simple", "-C"], [1, 4]),
]
EXECUTEMANY_ROWS = 10_000
EXECUTEMANY = """
import asyncio, os, ssl, sys, time
import asyncpg

async def main():
    env = os.environ
    ctx = None
    if env.get("PGSSLMODE", "disable") != "disable":
        ctx = ssl.create_default_context(cafile=env.get("PGSSLROOTCERT"))
    c = await asyncpg.connect(host=env["PGHOST"], port=int(env["PGPORT"]), user=env["PGUSER"],
                              password=env["PGPASSWORD"], database=env["PGDATABASE"], ssl=ctx)
    rows = [(i, f"row {i}") for i in range(int(sys.argv[1]))]
    t0 = time.perf_counter()
    await c.executemany("insert into bench_executemany values ($1, $2)", rows)
    took = time.perf_counter() - t0
    await c.close()
    print(took)

asyncio.run(main())
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


def pgbench(env, args, log_dir=None):
    cmd = ["pgbench", "-n", "-T", str(SECS)] + args
    if log_dir:
        cmd += ["-l", "--log-prefix", os.path.join(log_dir, "tx")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=log_dir)
    if out.returncode != 0:
        sys.exit(f"pgbench {' '.join(args)} failed: {out.stderr.strip()}")
    tps = float(re.search(r"tps = ([0-9.]+)", out.stdout).group(1))
    txs = int(re.search(r"number of transactions actually processed: (\d+)", out.stdout).group(1))
    conn = re.search(r"average connection time = ([0-9.]+) ms", out.stdout)
    lat = []
    if log_dir:
        for name in os.listdir(log_dir):
            if name.startswith("tx"):
                with open(os.path.join(log_dir, name)) as f:
                    lat += [int(line.split()[2]) for line in f if line.strip()]
                os.remove(os.path.join(log_dir, name))
    return tps, txs, lat, float(conn.group(1)) if conn else None


def executemany(env, pids, direct_env):
    """Seconds for asyncpg's executemany of EXECUTEMANY_ROWS rows, and the
    gateway CPU seconds it took. The table is made and emptied directly (a
    benchmark policy may refuse DDL or an unbounded write)."""
    subprocess.run(["psql", "-X", "-q", "-c",
                    "create table if not exists bench_executemany (a int, b text); "
                    "truncate bench_executemany"], env=direct_env, check=True,
                   capture_output=True)
    before = cpu_ticks(pids) if pids else 0
    out = subprocess.run([sys.executable, "-c", EXECUTEMANY, str(EXECUTEMANY_ROWS)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"asyncpg executemany failed: {out.stderr.strip()}")
    cpu = (cpu_ticks(pids) - before) / TICK if pids else 0
    return float(out.stdout.strip()), cpu


def main():
    work = tempfile.mkdtemp(prefix="gatehouse-bench-")
    os.chmod(work, 0o755)
    procs = []
    try:
        dev = subprocess.Popen(
            # No demo policy: the baseline is the path with audit and
            # recording only (GATEHOUSE_BENCH_POLICY applies one below).
            [os.path.abspath(f"{BIN}/gatehouse"), "dev", "--no-policy", "--data-dir",
             f"{work}/dev"],
            stdout=open(f"{work}/dev.out", "w"),
            stderr=subprocess.STDOUT,
            cwd=work,
            start_new_session=True,
        )
        procs.append(dev)
        for _ in range(240):
            if os.path.exists(f"{work}/dev/dev.env"):
                break
            time.sleep(0.5)
        else:
            sys.exit("gatehouse dev did not start; see " + f"{work}/dev.out")
        gw_env = dict(os.environ)
        with open(f"{work}/dev/dev.env") as f:
            for line in f:
                k, v = line.removeprefix("export ").strip().split("=", 1)
                # As a shell would: quotes removed, $PATH expanded.
                gw_env[k] = os.path.expandvars(v.strip('"'))
        # GATEHOUSE_BENCH_POLICY=policy.yaml: the gateway runs under that
        # policy document (guardrails on every statement, masking of results).
        policy = os.environ.get("GATEHOUSE_BENCH_POLICY")
        if policy:
            subprocess.run([os.path.abspath(f"{BIN}/gatehouse"), "policy", "apply", "-f",
                            os.path.abspath(policy)], env=gw_env, check=True)
        toml = open(f"{work}/dev/agent/agent.toml").read()
        pg_port = re.search(r"port = (\d+)", toml).group(1)
        pg_pw = open(f"{work}/dev/agent/demo.password").read().strip()
        direct_env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=pg_port,
                          PGUSER="gatehouse_agent", PGPASSWORD=pg_pw,
                          PGDATABASE="app", PGSSLMODE="disable")
        subprocess.run(["pgbench", "-i", "-s", "10", "-q"], env=direct_env,
                       check=True, capture_output=True)
        gw_pids = [
            int(p) for p in subprocess.run(
                ["pgrep", "-f", f"gatehouse-(server|agent) .*{work}"],
                capture_output=True, text=True).stdout.split()
        ]
        if len(gw_pids) != 2:
            sys.exit(f"expected the server and agent processes, found {gw_pids}")

        log_dir = f"{work}/logs"
        os.makedirs(log_dir)
        os.chmod(log_dir, 0o777)
        pipeline = f"{work}/pipeline.sql"
        with open(pipeline, "w") as f:
            f.write(PIPELINE)
        # pgbouncer, session pooling, plain TCP like direct.
        bouncer_port = str(free_port())
        with open(f"{work}/userlist.txt", "w") as f:
            f.write(f'"gatehouse_agent" "{pg_pw}"\n')
        with open(f"{work}/pgbouncer.ini", "w") as f:
            f.write(
                "[databases]\n"
                f"app = host=127.0.0.1 port={pg_port} dbname=app\n"
                "[pgbouncer]\n"
                f"listen_addr = 127.0.0.1\nlisten_port = {bouncer_port}\n"
                f"unix_socket_dir =\nauth_type = plain\nauth_file = {work}/userlist.txt\n"
                "pool_mode = session\nmax_client_conn = 100\ndefault_pool_size = 20\n"
                f"logfile = {log_dir}/pgbouncer.log\n"
            )
        run_as = ["-u", "postgres"] if os.geteuid() == 0 else []
        bouncer = subprocess.Popen(["pgbouncer"] + run_as + [f"{work}/pgbouncer.ini"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        procs.append(bouncer)
        bouncer_env = dict(direct_env, PGPORT=bouncer_port)
        for _ in range(50):
            if subprocess.run(["psql", "-X", "-c", "select 1"], env=bouncer_env,
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            sys.exit("pgbouncer did not start: " + open(f"{log_dir}/pgbouncer.log").read())

        paths = [("direct", direct_env, []), ("pgbouncer", bouncer_env, [bouncer.pid]),
                 ("gatehouse", gw_env, gw_pids)]
        results = {}
        only = os.environ.get("GATEHOUSE_BENCH_ONLY")
        workloads = [w for w in WORKLOADS if not only or re.search(only, w[0])]
        for wl, args, clients in workloads:
            args = [pipeline if a == "{pipeline}" else a for a in args]
            for c in clients:
                for _ in range(ROUNDS):
                    for name, env, pids in paths:
                        before = cpu_ticks(pids) if pids else 0
                        tps, txs, lat, conn = pgbench(
                            env, args + ["-c", str(c), "-j", str(min(c, 2))],
                            log_dir if c == 1 else None)
                        cpu = (cpu_ticks(pids) - before) / TICK if pids else 0
                        r = results.setdefault((wl, c, name), [0.0, 0, 0.0, [], []])
                        r[0] += tps / ROUNDS
                        r[1] += txs
                        r[2] += cpu
                        r[3] += lat
                        if conn is not None:
                            r[4].append(conn)
        em = {}
        if not only or re.search(only, "executemany"):
            for _ in range(ROUNDS):
                for name, env, pids in paths:
                    took, cpu = executemany(env, pids, direct_env)
                    r = em.setdefault(name, [0.0, 0.0])
                    r[0] += took / ROUNDS
                    r[1] += cpu
        print(f"\n{SECS} s per run, {ROUNDS} round(s), interleaved; "
              f"{os.cpu_count()} cores; pgbench scale 10")
        print(f"{'workload':24} {'clients':>7} {'path':10} {'tps':>9} {'x direct':>9} "
              f"{'p50 us':>8} {'p99 us':>8} {'+p50 us':>8} {'+p99 us':>8} {'cpu us/tx':>10} "
              f"{'conn ms':>8}")
        for wl, _, clients in workloads:
            for c in clients:
                base = results[(wl, c, "direct")]
                for name, _, pids in paths:
                    tps, txs, cpu, lat, conn = results[(wl, c, name)]
                    p50, p99 = percentile(lat, 50), percentile(lat, 99)
                    b50, b99 = percentile(base[3], 50), percentile(base[3], 99)
                    cells = [f"{wl:24}", f"{c:>7}", f"{name:10}", f"{tps:9.0f}",
                             f"{tps / base[0]:9.2f}"]
                    if lat:
                        cells += [f"{p50:8.0f}", f"{p99:8.0f}", f"{p50 - b50:8.0f}",
                                  f"{p99 - b99:8.0f}"]
                    else:
                        cells += [f"{'':>8}"] * 4
                    cells.append(f"{cpu / txs * 1e6:10.1f}" if pids else f"{'':>10}")
                    cells.append(f"{sum(conn) / len(conn):8.2f}" if conn else f"{'':>8}")
                    print(" ".join(cells))
        if em:
            base = em["direct"][0]
            for name, _, pids in paths:
                took, cpu = em[name]
                rate = EXECUTEMANY_ROWS / took
                cells = [f"{'asyncpg executemany':24}", f"{1:>7}", f"{name:10}",
                         f"{rate:9.0f}", f"{base / took:9.2f}"] + [f"{'':>8}"] * 4
                cells.append(f"{cpu / (EXECUTEMANY_ROWS * ROUNDS) * 1e6:10.1f}"
                             if pids else f"{'':>10}")
                print(" ".join(cells) + "  (rows/s; cpu per row)")
    finally:
        for p in procs:
            try:
                if p is procs[0]:
                    os.killpg(p.pid, signal.SIGINT)
                else:
                    p.terminate()
                p.wait(timeout=30)
            except Exception:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
