-- The schema the guardrail corpus runs against.
create table customers (id int primary key, name text not null, email text);
create table orders (id serial primary key, customer_id int references customers(id), amount numeric not null);
create schema payroll;
create table payroll.salaries (customer_id int, amount numeric);
insert into customers values (1, 'Ada', 'ada@example.com'), (2, 'Bob', 'bob@example.com');
insert into orders (customer_id, amount) values (1, 10), (1, 20), (2, 30);
insert into payroll.salaries values (1, 1000);
create materialized view order_totals as select customer_id, sum(amount) as total from orders group by 1;
