-- Side-effect corpus: functions with effects outside a pure read, under
-- different spellings and positions, and reads that use functions. Each
-- case starts with a `--@` line: a name, then `read` for a read that must
-- run under read-only.yaml, or the kind the case must be judged as. `pg`
-- marks a case PostgreSQL itself refuses in a read-only session (the second
-- wall). Statements are written so that, if one ever ran, it would change
-- nothing that matters (no real backend is signalled, no real file is
-- written). The SQL runs against schema.sql plus side-effects-schema.sql.

--@ terminate-backends server
SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'no-such-database'
--@ terminate-qualified server
SELECT pg_catalog.pg_terminate_backend(0)
--@ terminate-quoted server
SELECT "pg_terminate_backend"(0)
--@ terminate-quoted-qualified server
SELECT "pg_catalog"."pg_terminate_backend"(0)
--@ cancel-upper-case server
SELECT PG_CANCEL_BACKEND(0)
--@ cancel-in-subquery server
SELECT * FROM (SELECT pg_cancel_backend(0)) s
--@ terminate-in-cte server
WITH k AS (SELECT pg_terminate_backend(0)) SELECT * FROM k
--@ cancel-in-lateral server
SELECT c.id FROM customers c, LATERAL (SELECT pg_cancel_backend(0)) x
--@ cancel-in-aggregate server
SELECT array_agg(pg_cancel_backend(pid)) FROM pg_stat_activity WHERE datname = 'no-such-database'
--@ terminate-in-where server
SELECT name FROM customers WHERE pg_terminate_backend(0)
--@ terminate-in-exists server
SELECT 1 WHERE EXISTS (SELECT pg_terminate_backend(0))
--@ reload-conf server
SELECT pg_reload_conf()
--@ rotate-logfile server
SELECT pg_rotate_logfile()
--@ switch-wal server
SELECT pg_switch_wal()
--@ restore-point server
SELECT pg_create_restore_point('corpus')
--@ log-memory-contexts server
SELECT pg_log_backend_memory_contexts(0)
--@ promote server
SELECT pg_promote(false)
--@ backup-start server
SELECT pg_backup_start('corpus')
--@ read-file server
SELECT pg_read_file('/etc/passwd')
--@ read-binary-file-qualified server
SELECT pg_catalog.pg_read_binary_file('/etc/hostname')
--@ ls-dir-in-from server
SELECT * FROM pg_ls_dir('.')
--@ ls-dir-rows-from server
SELECT * FROM ROWS FROM (pg_ls_dir('.')) AS t(f)
--@ stat-file server
SELECT pg_stat_file('postgresql.conf')
--@ ls-waldir server
SELECT * FROM pg_ls_waldir()
--@ ls-logdir-in-exists server
SELECT name FROM customers WHERE EXISTS (SELECT 1 FROM pg_ls_logdir())
--@ current-logfile server
SELECT pg_current_logfile()
--@ lo-import server
SELECT lo_import('/etc/hostname')
--@ lo-export server
SELECT lo_export(1, '/tmp/gatehouse-corpus-export')
--@ lo-create write
SELECT lo_create(0)
--@ lo-creat write
SELECT lo_creat(-1)
--@ lo-create-quoted write
SELECT "lo_create"(0)
--@ lo-from-bytea write
SELECT lo_from_bytea(0, 'x')
--@ lo-unlink write
SELECT lo_unlink(424242)
--@ lo-put write
SELECT lo_put(424242, 0, 'x')
--@ lowrite write
SELECT lowrite(0, 'x')
--@ lo-truncate write
SELECT lo_truncate(0, 0)
--@ nextval write pg
SELECT nextval('orders_id_seq')
--@ nextval-qualified write pg
SELECT pg_catalog.nextval('public.orders_id_seq')
--@ nextval-upper-case write pg
SELECT NEXTVAL('orders_id_seq')
--@ nextval-regclass write pg
SELECT nextval('orders_id_seq'::regclass)
--@ setval write pg
SELECT setval('orders_id_seq', 100)
--@ nextval-in-where write pg
SELECT * FROM customers WHERE id = nextval('orders_id_seq')
--@ nextval-in-cte write pg
WITH s AS (SELECT nextval('orders_id_seq') AS v) SELECT v FROM s
--@ setval-in-lateral write pg
SELECT c.name FROM customers c CROSS JOIN LATERAL (SELECT setval('orders_id_seq', 50)) x
--@ nextval-scalar-subquery write pg
SELECT (SELECT nextval('orders_id_seq'))
--@ nextval-in-coalesce write pg
SELECT coalesce(NULL, nextval('orders_id_seq'))
--@ setval-in-case write pg
SELECT CASE WHEN true THEN setval('orders_id_seq', 7) END
--@ nextval-in-order-by write pg
SELECT * FROM customers ORDER BY nextval('orders_id_seq')
--@ nextval-in-values write pg
VALUES (nextval('orders_id_seq'))
--@ nextval-explain-analyze write pg
EXPLAIN ANALYZE SELECT nextval('orders_id_seq')
--@ nextval-prepared write
PREPARE bump AS SELECT nextval('orders_id_seq')
--@ notify utility
SELECT pg_notify('corpus', 'x')
--@ notify-qualified-in-where utility
SELECT x FROM unnest(ARRAY[1]) x WHERE pg_catalog.pg_notify('corpus', x::text) IS NULL
--@ advisory-lock lock
SELECT pg_advisory_lock(1)
--@ advisory-xact-lock lock
SELECT pg_advisory_xact_lock(1)
--@ advisory-try-lock-in-where lock
SELECT 1 WHERE pg_try_advisory_lock(42)
--@ advisory-lock-shared lock
SELECT pg_advisory_lock_shared(1)
--@ advisory-try-xact-lock-shared lock
SELECT pg_try_advisory_xact_lock_shared(1)
--@ advisory-unlock-all lock
SELECT pg_advisory_unlock_all()
--@ for-update lock pg
SELECT * FROM orders FOR UPDATE
--@ for-share lock pg
SELECT * FROM orders WHERE id = 1 FOR SHARE
--@ for-no-key-update-skip-locked lock pg
SELECT * FROM orders FOR NO KEY UPDATE SKIP LOCKED
--@ for-key-share-in-subquery lock pg
SELECT * FROM (SELECT * FROM orders FOR KEY SHARE) o
--@ for-update-of-nowait lock pg
SELECT * FROM orders o JOIN customers c ON c.id = o.customer_id FOR UPDATE OF o NOWAIT
--@ replication-slot server
SELECT pg_create_logical_replication_slot('corpus', 'test_decoding')
--@ drop-replication-slot server
SELECT pg_drop_replication_slot('corpus')
--@ logical-emit-message server
SELECT pg_logical_emit_message(true, 'corpus', 'x')
--@ replication-origin server
SELECT pg_replication_origin_create('corpus')
--@ logical-slot-get-changes server
SELECT * FROM pg_logical_slot_get_changes('corpus', NULL, NULL)
--@ set-config-role session
SELECT set_config('role', 'postgres', false)
--@ set-config-search-path session
SELECT set_config('search_path', 'payroll', false)
--@ set-config-work-mem config
SELECT set_config('work_mem', '1MB', false)
--@ set-config-computed-name session
SELECT set_config(name, setting, false) FROM pg_settings WHERE name = 'work_mem'
--@ stat-reset utility
SELECT pg_stat_reset()
--@ stat-reset-shared utility
SELECT pg_stat_reset_shared('bgwriter')
--@ stat-reset-table utility
SELECT pg_stat_reset_single_table_counters('customers'::regclass)
--@ dblink-connect server
SELECT dblink_connect('host=127.0.0.1 dbname=app')
--@ dblink-from server
SELECT * FROM dblink('dbname=app', 'select 1') AS t(a int)
--@ dblink-exec-qualified server
SELECT public.dblink_exec('dbname=app', 'delete from customers')
--@ query-to-xml procedural
SELECT query_to_xml('select pg_terminate_backend(0)', true, false, '')
--@ ts-stat procedural
SELECT * FROM ts_stat('select to_tsvector(name) from customers')
--@ volatile-user-function write pg
SELECT purge_orders()
--@ volatile-user-function-qualified write pg
SELECT public.purge_orders()
--@ volatile-user-function-in-from write pg
SELECT * FROM purge_orders()

--@ date-math read
SELECT now() + interval '1 day', date_trunc('month', now()), extract(year FROM now())
--@ age read
SELECT age(timestamp '2020-01-01')
--@ to-char read
SELECT to_char(now(), 'YYYY-MM-DD')
--@ clock-timestamp read
SELECT clock_timestamp() < now() + interval '1 hour'
--@ random read
SELECT random() < 2, gen_random_uuid() IS NOT NULL
--@ generate-series read
SELECT * FROM generate_series(now(), now() + interval '2 days', interval '1 day')
--@ string-functions read
SELECT upper(name), lower(email), length(name), md5(name) FROM customers
--@ concat-format read
SELECT concat_ws(',', name, email), format('%s <%s>', name, email) FROM customers
--@ regexp read
SELECT regexp_replace(email, '@.*', ''), split_part(email, '@', 2) FROM customers
--@ string-agg read
SELECT string_agg(name, ', ' ORDER BY name) FROM customers
--@ json read
SELECT json_build_object('id', id), row_to_json(c) FROM customers c
--@ jsonb-agg read
SELECT jsonb_agg(c) FROM customers c
--@ numeric read
SELECT round(avg(amount), 2), sum(amount) FROM orders
--@ pure-stable-user-function read
SELECT order_count()
--@ sequence-state read
SELECT last_value, is_called FROM orders_id_seq
--@ backend-pid read
SELECT pg_backend_pid() > 0
--@ current-setting read
SELECT current_setting('work_mem'), current_setting('default_transaction_read_only')
--@ show read
SHOW work_mem
--@ sizes read
SELECT pg_size_pretty(pg_total_relation_size('customers')), pg_relation_size('orders') >= 0
--@ privileges read
SELECT has_table_privilege('customers', 'select'), has_schema_privilege('public', 'usage')
--@ view-definition read
SELECT pg_get_viewdef('order_totals'::regclass)
--@ function-definition read
SELECT pg_get_functiondef('order_count'::regproc)
--@ stat-activity read
SELECT state FROM pg_stat_activity WHERE pid = pg_backend_pid()
--@ locks-view read
SELECT count(*) >= 0 FROM pg_locks
--@ in-recovery read
SELECT pg_is_in_recovery(), txid_current_if_assigned()
--@ settings-view read
SELECT setting FROM pg_settings WHERE name = 'work_mem'
--@ version read
SELECT version()
--@ sleep-zero read
SELECT pg_sleep(0)
--@ catalog-lookup read
SELECT c.relname, n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = 'customers'
--@ information-schema-columns read
SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'customers' ORDER BY ordinal_position
--@ regclass-cast read
SELECT 'customers'::regclass::oid > 0
--@ read-only-transaction read
BEGIN READ ONLY; SELECT count(*) FROM customers; COMMIT
--@ array-functions read
SELECT array_length(ARRAY[1, 2, 3], 1), unnest(ARRAY['a', 'b'])
--@ window-function read
SELECT id, row_number() OVER (ORDER BY amount DESC) FROM orders
--@ psql-describe read
\d
--@ psql-describe-tables read
\dt
--@ psql-describe-table read
\d customers
--@ psql-list-databases read
\l
--@ psql-describe-functions read
\df
--@ psql-describe-schemas read
\dn
