-- The example read models: one row per order, and order statistics per user (fed by many
-- order streams). Used by the tests, the benchmarks and the demo.
--
--   psql -f sql/examples/orders.sql            (after create extension pg_cqrs)
--
-- Commands (stream = 'order-<n>'):
--   CREATE_ORDER {user_id, currency}
--   ADD_ITEM     {user_id, sku, qty, price, amount}   amount = qty × price
--   SHIP_ORDER   {user_id, carrier}
--   CANCEL_ORDER {user_id, reason?}

create schema if not exists shop;

create table if not exists shop.order_summary (
    order_id   text primary key,
    user_id    text          not null,
    currency   text          not null,
    status     text          not null default 'open',
    item_count integer       not null default 0,
    total      numeric(14,2) not null default 0,
    carrier    text,
    opened_at  timestamptz,
    closed_at  timestamptz,
    rev        bigint        not null default 0
);

create table if not exists shop.user_order_stats (
    user_id          text primary key,
    orders           integer       not null default 0,
    open_orders      integer       not null default 0,
    shipped_orders   integer       not null default 0,
    cancelled_orders integer       not null default 0,
    items            integer       not null default 0,
    spent            numeric(16,2) not null default 0,
    last_order_at    timestamptz,
    rev              bigint        not null default 0
);

select cqrs.create_projection(
    name       => 'order_summary',
    target     => 'shop.order_summary',
    key_column => 'order_id',
    handlers   => '{
      "CREATE_ORDER": {"action": "upsert",
                       "set": {"user_id": "$.user_id", "currency": "$.currency",
                               "status": {"const": "open"}, "opened_at": {"field": "created_at"}}},
      "ADD_ITEM":     {"action": "update", "add": {"item_count": "$.qty", "total": "$.amount"}},
      "SHIP_ORDER":   {"action": "update",
                       "set": {"status": {"const": "shipped"}, "carrier": "$.carrier",
                               "closed_at": {"field": "created_at"}}},
      "CANCEL_ORDER": {"action": "update",
                       "set": {"status": {"const": "cancelled"}, "closed_at": {"field": "created_at"}}}
    }');

select cqrs.create_projection(
    name       => 'user_order_stats',
    target     => 'shop.user_order_stats',
    key_column => 'user_id',
    handlers   => '{
      "CREATE_ORDER": {"action": "upsert", "key": "$.user_id",
                       "add": {"orders": {"const": 1}, "open_orders": {"const": 1}},
                       "set": {"last_order_at": {"field": "created_at"}}},
      "ADD_ITEM":     {"action": "update", "key": "$.user_id", "add": {"items": "$.qty", "spent": "$.amount"}},
      "SHIP_ORDER":   {"action": "update", "key": "$.user_id",
                       "add": {"open_orders": {"const": -1}, "shipped_orders": {"const": 1}}},
      "CANCEL_ORDER": {"action": "update", "key": "$.user_id",
                       "add": {"open_orders": {"const": -1}, "cancelled_orders": {"const": 1}}}
    }');
