// Prints `name<TAB>provolatile` for every function in pg_catalog of the
// PGlite build named on the command line, then its PostgreSQL version on
// stderr.
const { PGlite } = await import(process.argv[2]);
const db = new PGlite();
const v = await db.query("select current_setting('server_version') as v");
const r = await db.query(
  "select p.proname, p.provolatile from pg_catalog.pg_proc p " +
    "where p.pronamespace = 'pg_catalog'::regnamespace order by 1, 2",
);
for (const row of r.rows) console.log(`${row.proname}\t${row.provolatile}`);
console.error(v.rows[0].v);
await db.close();
