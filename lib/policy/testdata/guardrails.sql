-- Guardrail corpus. Each case starts with a `--@` line: a name, then the
-- expected decision under readonly.yaml and under writes-need-approval.yaml.
-- The SQL runs against the schema in schema.sql.

--@ select-star readonly=allow writes=allow
SELECT * FROM customers
--@ select-where readonly=allow writes=allow
SELECT name FROM customers WHERE id = 1
--@ select-join readonly=allow writes=allow
SELECT c.name, o.amount FROM customers c JOIN orders o ON o.customer_id = c.id
--@ select-subquery readonly=allow writes=allow
SELECT * FROM customers WHERE id IN (SELECT customer_id FROM orders)
--@ select-lateral readonly=allow writes=allow
SELECT c.id, x.amount FROM customers c, LATERAL (SELECT amount FROM orders o WHERE o.customer_id = c.id LIMIT 1) x
--@ select-aggregate readonly=allow writes=allow
SELECT customer_id, sum(amount) FROM orders GROUP BY customer_id HAVING sum(amount) > 10
--@ select-window readonly=allow writes=allow
SELECT id, rank() OVER (ORDER BY amount DESC) FROM orders
--@ select-union readonly=allow writes=allow
SELECT id FROM customers UNION ALL SELECT id FROM orders
--@ select-values readonly=allow writes=allow
VALUES (1, 'a'), (2, 'b')
--@ table-command readonly=allow writes=allow
TABLE customers
--@ select-literal readonly=allow writes=allow
SELECT 1
--@ select-now readonly=allow writes=allow
SELECT now(), current_user, version()
--@ select-read-only-cte readonly=allow writes=allow
WITH big AS (SELECT * FROM orders WHERE amount > 10) SELECT count(*) FROM big
--@ select-recursive-cte readonly=allow writes=allow
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5) SELECT sum(i) FROM n
--@ select-for-update readonly=deny writes=approve
SELECT * FROM orders WHERE id = 1 FOR UPDATE
--@ select-schema-qualified readonly=allow writes=allow
SELECT * FROM public.customers
--@ select-catalog readonly=allow writes=allow
SELECT relname FROM pg_catalog.pg_class WHERE relkind = 'r' LIMIT 3
--@ select-information-schema readonly=allow writes=allow
SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'
--@ select-pg-sleep readonly=allow writes=allow
SELECT pg_sleep(0)
--@ select-lower-case readonly=allow writes=allow
select * from customers where id = 2
--@ select-mixed-case readonly=allow writes=allow
SeLeCt NaMe FrOm CuStOmErS
--@ select-quoted-ident readonly=allow writes=allow
SELECT "name" FROM "customers"
--@ select-string-with-keywords readonly=allow writes=allow
SELECT 'DROP TABLE customers; DELETE FROM orders' AS harmless
--@ select-dollar-quoted readonly=allow writes=allow
SELECT $$; DELETE FROM orders; $$ AS text
--@ select-tagged-dollar readonly=allow writes=allow
SELECT $x$ DROP TABLE customers $x$ AS text
--@ select-block-comment-hides-delete readonly=allow writes=allow
SELECT 1 /* ; DELETE FROM orders */
--@ select-line-comment-hides-delete readonly=allow writes=allow
SELECT 1 -- ; DELETE FROM orders
--@ select-nested-comment readonly=allow writes=allow
SELECT 1 /* outer /* inner ; DROP TABLE customers */ still comment */
--@ select-escape-string readonly=allow writes=allow
SELECT E'it\'s; DELETE FROM orders'
--@ select-unicode-ident readonly=allow writes=allow
SELECT U&"n\0061me" FROM customers
--@ select-json readonly=allow writes=allow
SELECT jsonb_build_object('a', 1) -> 'a'
--@ select-generate-series readonly=allow writes=allow
SELECT count(*) FROM generate_series(1, 100)
--@ select-plain-function readonly=allow writes=allow
SELECT length(name) FROM customers
--@ show readonly=allow writes=allow
SHOW search_path
--@ show-all readonly=allow writes=allow
SHOW ALL
--@ explain-select readonly=allow writes=allow
EXPLAIN SELECT * FROM customers
--@ explain-analyze-select readonly=allow writes=allow
EXPLAIN ANALYZE SELECT * FROM customers
--@ explain-delete-plan-only readonly=allow writes=allow
EXPLAIN DELETE FROM orders WHERE id = 1
--@ explain-update-no-where-plan-only readonly=allow writes=allow
EXPLAIN UPDATE orders SET amount = 0
--@ explain-analyze-false-delete readonly=allow writes=allow
EXPLAIN (ANALYZE false) DELETE FROM orders WHERE id = 1
--@ explain-analyze-delete readonly=deny writes=approve
EXPLAIN ANALYZE DELETE FROM orders WHERE id = 1
--@ explain-analyze-option-delete readonly=deny writes=approve
EXPLAIN (ANALYZE, COSTS OFF) DELETE FROM orders WHERE id = 1
--@ explain-analyze-true-update readonly=deny writes=approve
EXPLAIN (ANALYZE true) UPDATE orders SET amount = 1 WHERE id = 1
--@ explain-analyze-delete-no-where readonly=deny writes=deny
EXPLAIN ANALYZE DELETE FROM orders
--@ explain-analyze-terminate readonly=deny writes=deny
EXPLAIN ANALYZE SELECT pg_terminate_backend(0)
--@ begin readonly=allow writes=allow
BEGIN
--@ commit readonly=allow writes=allow
COMMIT
--@ rollback readonly=allow writes=allow
ROLLBACK
--@ transaction-block-of-reads readonly=allow writes=allow
BEGIN; SELECT 1; SELECT count(*) FROM orders; COMMIT
--@ savepoint readonly=allow writes=allow
BEGIN; SAVEPOINT a; SELECT 1; ROLLBACK TO SAVEPOINT a; RELEASE SAVEPOINT a; COMMIT
--@ set-transaction readonly=allow writes=allow
BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SELECT 1; COMMIT
--@ start-transaction-read-only readonly=allow writes=allow
START TRANSACTION READ ONLY; SELECT 1; COMMIT
--@ set-statement-timeout readonly=allow writes=allow
SET statement_timeout = '5s'
--@ set-application-name readonly=allow writes=allow
SET application_name = 'report'
--@ reset-one-setting readonly=allow writes=allow
RESET statement_timeout
--@ set-local-work-mem readonly=allow writes=allow
BEGIN; SET LOCAL work_mem = '8MB'; SELECT 1; COMMIT
--@ deallocate-all readonly=allow writes=allow
DEALLOCATE ALL
--@ declare-fetch readonly=allow writes=allow
BEGIN; DECLARE c CURSOR FOR SELECT * FROM customers; FETCH 2 FROM c; CLOSE c; COMMIT
--@ prepare-select readonly=allow writes=allow
PREPARE q(int) AS SELECT * FROM customers WHERE id = $1
--@ prepare-execute-select readonly=allow writes=allow
PREPARE q2(int) AS SELECT * FROM customers WHERE id = $1; EXECUTE q2(1)
--@ empty-statement readonly=allow writes=allow
;
--@ copy-to-stdout readonly=allow writes=allow
COPY customers TO STDOUT
--@ copy-query-to-stdout readonly=allow writes=allow
COPY (SELECT id FROM orders) TO STDOUT WITH (FORMAT csv)
--@ insert readonly=deny writes=approve
INSERT INTO orders (customer_id, amount) VALUES (1, 5)
--@ insert-select readonly=deny writes=approve
INSERT INTO orders (customer_id, amount) SELECT id, 1 FROM customers
--@ insert-on-conflict readonly=deny writes=approve
INSERT INTO customers (id, name, email) VALUES (1, 'x', 'x@example.com') ON CONFLICT (id) DO UPDATE SET name = excluded.name
--@ insert-returning readonly=deny writes=approve
INSERT INTO orders (customer_id, amount) VALUES (2, 7) RETURNING id
--@ insert-lower-case readonly=deny writes=approve
insert into orders (customer_id, amount) values (1, 1)
--@ insert-quoted-table readonly=deny writes=approve
INSERT INTO "orders" (customer_id, amount) VALUES (1, 1)
--@ insert-qualified readonly=deny writes=approve
INSERT INTO public.orders (customer_id, amount) VALUES (1, 1)
--@ update-where readonly=deny writes=approve
UPDATE orders SET amount = amount + 1 WHERE id = 1
--@ update-from readonly=deny writes=approve
UPDATE orders o SET amount = 0 FROM customers c WHERE c.id = o.customer_id AND c.name = 'Ada'
--@ update-mixed-case readonly=deny writes=approve
UpDaTe OrDeRs SeT amount = 2 WhErE id = 2
--@ update-where-true readonly=deny writes=approve
UPDATE orders SET amount = 3 WHERE true
--@ update-no-where readonly=deny writes=deny
UPDATE orders SET amount = 0
--@ update-no-where-returning readonly=deny writes=deny
UPDATE customers SET email = NULL RETURNING id
--@ delete-where readonly=deny writes=approve
DELETE FROM orders WHERE id = 1
--@ delete-using readonly=deny writes=approve
DELETE FROM orders o USING customers c WHERE c.id = o.customer_id AND c.name = 'Bob'
--@ delete-where-current-of readonly=deny writes=approve
BEGIN; DECLARE d CURSOR FOR SELECT * FROM orders FOR UPDATE; FETCH 1 FROM d; DELETE FROM orders WHERE CURRENT OF d; COMMIT
--@ delete-no-where readonly=deny writes=deny
DELETE FROM orders
--@ delete-no-where-lower readonly=deny writes=deny
delete from orders
--@ delete-only readonly=deny writes=deny
DELETE FROM ONLY orders
--@ truncate readonly=deny writes=deny
TRUNCATE orders
--@ truncate-cascade readonly=deny writes=deny
TRUNCATE TABLE customers CASCADE
--@ merge readonly=deny writes=approve
MERGE INTO orders o USING customers c ON o.customer_id = c.id WHEN MATCHED THEN UPDATE SET amount = 1
--@ writable-cte-delete readonly=deny writes=approve
WITH gone AS (DELETE FROM orders WHERE amount < 0 RETURNING *) SELECT count(*) FROM gone
--@ writable-cte-delete-no-where readonly=deny writes=deny
WITH gone AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM gone
--@ writable-cte-update readonly=deny writes=approve
WITH u AS (UPDATE customers SET name = upper(name) WHERE id = 1 RETURNING id) SELECT * FROM u
--@ writable-cte-insert readonly=deny writes=approve
WITH i AS (INSERT INTO orders (customer_id, amount) VALUES (1, 9) RETURNING id) SELECT id FROM i
--@ nested-writable-cte readonly=deny writes=approve
WITH a AS (SELECT 1), b AS (WITH c AS (DELETE FROM orders WHERE id = 2 RETURNING id) SELECT * FROM c) SELECT * FROM b
--@ select-then-delete readonly=deny writes=approve
SELECT 1; DELETE FROM orders WHERE id = 1
--@ delete-after-comment readonly=deny writes=approve
/* SELECT */ DELETE FROM orders WHERE id = 3
--@ delete-after-line-comment readonly=deny writes=approve
-- SELECT 1
DELETE FROM orders WHERE id = 3
--@ delete-hidden-in-whitespace readonly=deny writes=approve
   
	DELETE	FROM	orders	WHERE	id = 3
--@ read-then-write-then-read readonly=deny writes=approve
SELECT 1; INSERT INTO orders (customer_id, amount) VALUES (1, 2); SELECT 2
--@ transaction-with-write readonly=deny writes=approve
BEGIN; UPDATE orders SET amount = 5 WHERE id = 1; COMMIT
--@ copy-from-stdin readonly=deny writes=approve
COPY orders (customer_id, amount) FROM STDIN
--@ prepare-delete readonly=deny writes=approve
PREPARE del(int) AS DELETE FROM orders WHERE id = $1
--@ prepare-execute-delete readonly=deny writes=approve
PREPARE del2(int) AS DELETE FROM orders WHERE id = $1; EXECUTE del2(1)
--@ prepare-delete-no-where readonly=deny writes=deny
PREPARE wipe AS DELETE FROM orders
--@ execute-unknown readonly=deny writes=deny
EXECUTE never_prepared(1)
--@ select-into readonly=deny writes=approve
SELECT * INTO customers_copy FROM customers
--@ select-into-temp readonly=deny writes=approve
SELECT id INTO TEMP tmp_ids FROM orders
--@ create-table-as readonly=deny writes=approve
CREATE TABLE orders_copy AS SELECT * FROM orders
--@ create-materialized-view readonly=deny writes=approve
CREATE MATERIALIZED VIEW mv_orders AS SELECT * FROM orders
--@ refresh-materialized-view readonly=deny writes=approve
REFRESH MATERIALIZED VIEW order_totals
--@ create-table readonly=deny writes=approve
CREATE TABLE t_new (id int)
--@ create-temp-table readonly=deny writes=approve
CREATE TEMP TABLE t_tmp (id int)
--@ create-index readonly=deny writes=approve
CREATE INDEX orders_amount_idx ON orders (amount)
--@ create-view readonly=deny writes=approve
CREATE VIEW v_customers AS SELECT id, name FROM customers
--@ create-function readonly=deny writes=approve
CREATE FUNCTION f_one() RETURNS int LANGUAGE sql AS 'SELECT 1'
--@ create-schema readonly=deny writes=approve
CREATE SCHEMA s_new
--@ create-sequence readonly=deny writes=approve
CREATE SEQUENCE seq_new
--@ create-extension readonly=deny writes=approve
CREATE EXTENSION IF NOT EXISTS pgcrypto
--@ create-trigger readonly=deny writes=approve
CREATE TRIGGER trg BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()
--@ alter-table-add-column readonly=deny writes=approve
ALTER TABLE customers ADD COLUMN phone text
--@ alter-table-drop-column readonly=deny writes=approve
ALTER TABLE customers DROP COLUMN email
--@ alter-table-rename readonly=deny writes=approve
ALTER TABLE orders RENAME TO orders_old
--@ drop-table readonly=deny writes=approve
DROP TABLE orders
--@ drop-table-if-exists-cascade readonly=deny writes=approve
DROP TABLE IF EXISTS customers CASCADE
--@ drop-schema readonly=deny writes=approve
DROP SCHEMA payroll CASCADE
--@ drop-view readonly=deny writes=approve
DROP MATERIALIZED VIEW order_totals
--@ drop-lower-case readonly=deny writes=approve
drop table orders
--@ comment-on readonly=deny writes=approve
COMMENT ON TABLE customers IS 'people'
--@ ddl-after-comment readonly=deny writes=approve
/* just a read */ DROP TABLE orders
--@ ddl-in-multi readonly=deny writes=approve
SELECT 1; DROP TABLE orders; SELECT 2
--@ grant readonly=deny writes=deny
GRANT SELECT ON customers TO PUBLIC
--@ grant-all readonly=deny writes=deny
GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC
--@ revoke readonly=deny writes=deny
REVOKE SELECT ON orders FROM PUBLIC
--@ create-role readonly=deny writes=deny
CREATE ROLE intruder LOGIN SUPERUSER PASSWORD 'x'
--@ create-user readonly=deny writes=deny
CREATE USER intruder2
--@ alter-role readonly=deny writes=deny
ALTER ROLE current_user SET search_path = payroll
--@ alter-user-superuser readonly=deny writes=deny
ALTER USER current_user WITH SUPERUSER
--@ drop-role readonly=deny writes=deny
DROP ROLE IF EXISTS reporting
--@ grant-role readonly=deny writes=deny
GRANT pg_read_server_files TO current_user
--@ alter-default-privileges readonly=deny writes=deny
ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC
--@ alter-owner readonly=deny writes=deny
ALTER TABLE customers OWNER TO CURRENT_USER
--@ create-policy readonly=deny writes=deny
CREATE POLICY p ON customers USING (true)
--@ reassign-owned readonly=deny writes=deny
REASSIGN OWNED BY CURRENT_USER TO CURRENT_USER
--@ set-role readonly=deny writes=deny
SET ROLE postgres
--@ set-local-role readonly=deny writes=deny
BEGIN; SET LOCAL ROLE postgres; SELECT 1; COMMIT
--@ reset-role readonly=deny writes=deny
RESET ROLE
--@ set-session-authorization readonly=deny writes=deny
SET SESSION AUTHORIZATION postgres
--@ set-search-path readonly=deny writes=deny
SET search_path = payroll, public
--@ set-search-path-to readonly=deny writes=deny
SET search_path TO DEFAULT
--@ set-role-mixed-case readonly=deny writes=deny
sEt RoLe postgres
--@ reset-all readonly=deny writes=deny
RESET ALL
--@ discard-all readonly=deny writes=deny
DISCARD ALL
--@ set-config-role readonly=deny writes=deny
SELECT set_config('role', 'postgres', false)
--@ set-config-qualified readonly=deny writes=deny
SELECT pg_catalog.set_config('search_path', 'payroll', false)
--@ set-config-uppercase readonly=deny writes=deny
SELECT SET_CONFIG('role', 'postgres', false)
--@ terminate-backend readonly=deny writes=deny
SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()
--@ cancel-backend readonly=deny writes=deny
SELECT pg_cancel_backend(0)
--@ terminate-in-subquery readonly=deny writes=deny
SELECT * FROM customers WHERE id = (SELECT pg_terminate_backend(0)::int)
--@ terminate-in-cte readonly=deny writes=deny
WITH x AS (SELECT pg_terminate_backend(0)) SELECT * FROM x
--@ terminate-quoted readonly=deny writes=deny
SELECT "pg_terminate_backend"(0)
--@ lo-import readonly=deny writes=deny
SELECT lo_import('/etc/passwd')
--@ lo-export readonly=deny writes=deny
SELECT lo_export(0, '/tmp/x')
--@ read-file readonly=deny writes=deny
SELECT pg_read_file('/etc/passwd')
--@ read-binary-file readonly=deny writes=deny
SELECT pg_read_binary_file('postgresql.conf')
--@ ls-dir readonly=deny writes=deny
SELECT pg_ls_dir('.')
--@ dblink-exec readonly=deny writes=deny
SELECT dblink_exec('dbname=postgres', 'DROP TABLE orders')
--@ reload-conf readonly=deny writes=deny
SELECT pg_reload_conf()
--@ advisory-lock readonly=deny writes=deny
SELECT pg_advisory_lock(1)
--@ nextval readonly=deny writes=approve
SELECT nextval('orders_id_seq')
--@ setval readonly=deny writes=approve
SELECT setval('orders_id_seq', 1000)
--@ function-in-where readonly=deny writes=deny
SELECT 1 WHERE pg_reload_conf()
--@ payroll-read readonly=deny writes=deny
SELECT * FROM payroll.salaries
--@ payroll-read-join readonly=deny writes=deny
SELECT c.name FROM customers c JOIN payroll.salaries s ON s.customer_id = c.id
--@ payroll-read-in-cte readonly=deny writes=deny
WITH s AS (SELECT * FROM payroll.salaries) SELECT count(*) FROM s
--@ payroll-read-mixed-case readonly=deny writes=deny
SELECT * FROM PAYROLL.SALARIES
--@ payroll-explain readonly=deny writes=deny
EXPLAIN SELECT * FROM payroll.salaries
--@ do-block readonly=deny writes=deny
DO $$ BEGIN DELETE FROM orders; END $$
--@ do-block-harmless readonly=deny writes=deny
DO $$ BEGIN PERFORM 1; END $$
--@ do-block-language readonly=deny writes=deny
DO LANGUAGE plpgsql $body$ BEGIN EXECUTE 'DROP TABLE orders'; END $body$
--@ call-procedure readonly=deny writes=deny
CALL some_procedure()
--@ copy-program readonly=deny writes=deny
COPY orders TO PROGRAM 'cat > /tmp/orders'
--@ copy-from-program readonly=deny writes=deny
COPY orders FROM PROGRAM 'echo 1'
--@ copy-to-file readonly=deny writes=deny
COPY customers TO '/tmp/customers.csv'
--@ copy-from-file readonly=deny writes=deny
COPY orders FROM '/etc/passwd'
--@ copy-query-to-program readonly=deny writes=deny
COPY (SELECT * FROM customers) TO PROGRAM 'cat'
--@ load readonly=deny writes=deny
LOAD 'auto_explain'
--@ alter-system readonly=deny writes=deny
ALTER SYSTEM SET log_statement = 'none'
--@ vacuum readonly=deny writes=deny
VACUUM orders
--@ analyze readonly=deny writes=deny
ANALYZE orders
--@ checkpoint readonly=deny writes=deny
CHECKPOINT
--@ lock-table readonly=deny writes=deny
BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE; COMMIT
--@ listen readonly=deny writes=deny
LISTEN jobs
--@ notify readonly=deny writes=deny
NOTIFY jobs, 'x'
--@ cluster readonly=deny writes=deny
CLUSTER orders USING orders_pkey
--@ reindex readonly=deny writes=deny
REINDEX TABLE orders
--@ unparseable-typo readonly=deny writes=deny
SELEC * FROM customers
--@ unparseable-incomplete readonly=deny writes=deny
DELETE FROM
--@ unparseable-unterminated-string readonly=deny writes=deny
SELECT 'unterminated
--@ unparseable-unterminated-dollar readonly=deny writes=deny
SELECT $$ never closed
--@ unparseable-after-valid readonly=deny writes=deny
SELECT 1; SELEC 2
--@ unparseable-garbage readonly=deny writes=deny
)))(((
