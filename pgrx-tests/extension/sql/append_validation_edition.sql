-- The extension edition: typed settings (a typo is an error, not a placeholder) and the full
-- JSON Schema validator (every keyword of drafts 4 to 2020-12; the schema itself validated
-- against its meta-schema).
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
show cqrs.require_registered_types;
-- a typo in the setting name is an error, not a silent placeholder
set cqrs.require_registerd_types = on;
\echo :LAST_ERROR_SQLSTATE
set cqrs.require_registered_types = 'maybe';
\echo :LAST_ERROR_SQLSTATE
-- invalid schemas are refused at registration
select cqrs.register_command_type('BROKEN', '{"type": "no-such-type"}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.register_command_type('REMOTE', '{"$ref": "https://example.com/schema.json"}');
\echo :LAST_ERROR_SQLSTATE
-- keywords beyond the portable edition's subset are validated here
select cqrs.register_command_type('LIST', '{"type": "object", "properties": {"xs": {"type": "array", "contains": {"const": 1}}}, "dependentRequired": {"a": ["b"]}}') > 0 as registered;
select seq from cqrs.append(cqrs.uuid_v7(), 'l-1', 'LIST', '{"xs": [2, 3]}');
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 'l-1', 'LIST', '{"xs": [1], "a": 1}');
\echo :LAST_ERROR_SQLSTATE
rollback;
