-- Payload validation against registered JSON Schemas.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql

select cqrs.register_command_type('ADD_ITEM', '{
  "type": "object",
  "required": ["sku", "qty"],
  "properties": {
    "sku": {"type": "string", "minLength": 1},
    "qty": {"type": "integer", "minimum": 1},
    "tags": {"type": "array", "items": {"type": "string"}},
    "email": {"type": "string", "format": "email"}
  },
  "additionalProperties": false
}') as first_version \gset
select :first_version > 0 as registered;

select seq from cqrs.append(cqrs.uuid_v7(), 'o-1', 'ADD_ITEM', '{"sku": "a", "qty": 1}');

-- each failure names the JSON pointer of the offending field (22023)
select seq from cqrs.append(cqrs.uuid_v7(), 'o-1', 'ADD_ITEM', '{"sku": "a", "qty": 0}');
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 'o-1', 'ADD_ITEM', '{"sku": "a"}');
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 'o-1', 'ADD_ITEM', '{"sku": "a", "qty": 1, "tags": ["x", 2]}');
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 'o-1', 'ADD_ITEM', '{"sku": "a", "qty": 1, "colour": "red"}');
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 'o-1', 'ADD_ITEM', '{"sku": "a", "qty": 1, "email": "not-an-email"}');
\echo :LAST_ERROR_SQLSTATE

-- unregistered types are accepted while cqrs.require_registered_types is off (the default)
select seq from cqrs.append(cqrs.uuid_v7(), 'o-1', 'FREE_FORM', '{"anything": [1, 2]}');
-- (the installer's setting: pg_temp.cqrs_set, in install.sql, sets it the edition's way)
call pg_temp.cqrs_set('require_registered_types', 'on');
select seq from cqrs.append(cqrs.uuid_v7(), 'o-1', 'FREE_FORM', '{"anything": [1, 2]}');
\echo :LAST_ERROR_SQLSTATE
call pg_temp.cqrs_set('require_registered_types', 'off');

-- a rejected payload consumed no seq
select last_seq from cqrs.stream where stream = 'o-1';

-- re-registration takes effect at once, in this session and in cached validators
select cqrs.register_command_type('ADD_ITEM', '{"type": "object", "required": ["sku"]}') > :first_version as version_bumped;
select seq from cqrs.append(cqrs.uuid_v7(), 'o-1', 'ADD_ITEM', '{"sku": "b"}');
select count(*) as types from cqrs.command_type;

-- unregistering
select cqrs.unregister_command_type('ADD_ITEM') as unregistered, cqrs.unregister_command_type('ADD_ITEM') as again;
select seq from cqrs.append(cqrs.uuid_v7(), 'o-1', 'ADD_ITEM', '{"no": "schema now"}');

-- names are refused at registration
select cqrs.register_command_type('', '{}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.register_command_type(null, '{}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.register_command_type('X', null);
\echo :LAST_ERROR_SQLSTATE
select cqrs.register_command_type(repeat('T', 129), '{}');
\echo :LAST_ERROR_SQLSTATE

-- a typo deep in a schema is named by its place, the same in both editions
select cqrs.register_command_type('TYPO', '{"type": "object", "properties": {"total": {"type": "objekt"}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.register_command_type('TYPO', '{"anyOf": [{"type": "string"}, {"type": ["null", "nummber"]}]}');
\echo :LAST_ERROR_SQLSTATE
-- a format neither edition knows ("isbn") is an annotation, as the specification says: accepted,
-- and checked by neither
select cqrs.register_command_type('BOOK', '{"properties": {"isbn": {"type": "string", "format": "isbn"}}}') > 0 as registered;
select seq from cqrs.append(cqrs.uuid_v7(), 'b-1', 'BOOK', '{"isbn": "not an isbn"}');

rollback;
