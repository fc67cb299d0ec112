#!/usr/bin/env bash
# Derives lib/policy/src/functions.tsv, the built-in functions the policy
# judges by name, from PostgreSQL's own catalogs:
#   - PostgreSQL 15 (the Debian server on this machine), with its contrib
#     extensions created so their functions are listed too;
#   - PostgreSQL 16, 17 and 18 as PGlite builds (PostgreSQL compiled to
#     WebAssembly, pinned in package.json), read with node.
# Every function name is given the class of the first matching pattern in
# classes.tsv (the reviewed part); a VOLATILE function no pattern matches
# stops the script. Run it after a PostgreSQL release and commit both files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/../src/functions.tsv"
pgbin="${PG_BIN:-/usr/lib/postgresql/15/bin}"
work="$(mktemp -d)"
trap 'if [ -f "$work/data/postmaster.pid" ]; then run "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null || true; fi; rm -rf "$work"' EXIT

# initdb refuses root: run the server as postgres when we are root.
run() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; else "$@"; fi; }
if [ "$(id -u)" = 0 ]; then chown postgres "$work"; fi

run "$pgbin/initdb" -D "$work/data" -U postgres -A trust >/dev/null
run "$pgbin/pg_ctl" -D "$work/data" -l "$work/log" -w \
  -o "-k $work -c listen_addresses= -p 5432" start >/dev/null
sql() { psql -X -q -h "$work" -p 5432 -U postgres -At -F $'\t' -v ON_ERROR_STOP=1 "$@" postgres; }
extensions=""
for e in adminpack amcheck dblink file_fdw old_snapshot pageinspect pg_buffercache \
  pg_freespacemap pg_prewarm pg_stat_statements pg_surgery pg_visibility pg_walinspect \
  pgrowlocks pgstattuple postgres_fdw; do
  if sql -c "create extension if not exists $e" 2>/dev/null; then extensions="$extensions $e"; fi
done
v15="$(sql -c "show server_version")"
sql -c "select p.proname, p.provolatile from pg_catalog.pg_proc p
        where p.pronamespace = 'pg_catalog'::regnamespace
           or exists (select from pg_catalog.pg_depend d
                      where d.objid = p.oid and d.deptype = 'e'
                        and d.classid = 'pg_catalog.pg_proc'::regclass)" >"$work/all"

(cd "$here" && npm ci --no-audit --no-fund --silent >/dev/null)
versions="$v15"
for v in pg16 pg17 pg18; do
  node "$here/catalog.mjs" "$here/node_modules/$v/dist/index.js" >>"$work/all" 2>"$work/version"
  versions="$versions, $(cat "$work/version")"
done

python3 - "$here/classes.tsv" "$work/all" "$out" "$versions" "$extensions" <<'PY'
import re, sys
classes, catalog, out, versions, extensions = sys.argv[1:]
rules = []
for line in open(classes):
    if line.strip() and not line.startswith("#"):
        cls, pattern = line.rstrip("\n").split("\t")
        rules.append((cls, re.compile(f"(?:{pattern})")))
volatile = {}
for line in open(catalog):
    name, vol = line.rstrip("\n").split("\t")
    volatile[name] = volatile.get(name, False) or vol == "v"
rows, unreviewed = [], []
for name in sorted(volatile):
    cls = next((c for c, p in rules if p.fullmatch(name)), None)
    if cls is None and volatile[name]:
        unreviewed.append(name)
    rows.append((name, "-" if cls in (None, "none") else cls))
if unreviewed:
    sys.exit("volatile functions no pattern of classes.tsv covers: " + ", ".join(unreviewed))
with open(out, "w") as f:
    f.write("# Built-in functions by name, and the class of what they do beyond a read\n")
    f.write("# ('-' for none). Derived by lib/policy/catalog/derive.sh from the catalogs of\n")
    f.write(f"# PostgreSQL {versions}, with the contrib extensions{extensions}.\n")
    f.write("# Do not edit: change classes.tsv and run the script.\n")
    for name, cls in rows:
        f.write(f"{name}\t{cls}\n")
print(f"{out}: {len(rows)} functions, {sum(c != '-' for _, c in rows)} with effects")
PY
