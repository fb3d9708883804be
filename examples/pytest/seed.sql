-- The seeded base every test gets a branch of.
create table customers (id int primary key, name text not null);
create table orders (id serial primary key, customer int references customers, total numeric not null);
insert into customers select g, 'customer ' || g from generate_series(1, 100) g;
insert into orders (customer, total) select 1 + g % 100, g from generate_series(1, 1000) g;
