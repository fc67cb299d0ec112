-- User functions the side-effect corpus calls, next to schema.sql.
create function purge_orders() returns setof int language sql volatile
  as 'delete from orders returning id';
create function order_count() returns bigint language sql stable
  as 'select count(*) from orders';
