-- The portable edition: settings are placeholders (PL/pgSQL cannot register typed ones), and
-- the JSON Schema validator reads drafts 2020-12, 2019-09 and 07 — a schema with what it cannot
-- check as the extension does is refused at registration with 0A000 naming it, never accepted
-- and then ignored.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
show cqrs.require_registered_types;
\echo :LAST_ERROR_SQLSTATE
-- invalid schemas are refused at registration
select cqrs.register_command_type('BROKEN', '{"type": "no-such-type"}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.register_command_type('REMOTE', '{"$ref": "https://example.com/schema.json"}');
\echo :LAST_ERROR_SQLSTATE
-- a dynamic reference of another draft (draft-07 has neither): the extension would ignore it
select cqrs.register_command_type('DYNAMIC', '{"$schema": "http://json-schema.org/draft-07/schema#", "$dynamicRef": "#meta", "definitions": {"m": {"$dynamicAnchor": "meta"}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.register_command_type('REGEX', '{"properties": {"r": {"type": "string", "format": "regex"}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.register_command_type('LETTERS', '{"properties": {"name": {"type": "string", "pattern": "^\\p{Letter}+$"}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.register_command_type('ANCIENT', '{"$schema": "http://json-schema.org/draft-04/schema#", "type": "object"}');
\echo :LAST_ERROR_SQLSTATE
-- a $ref of an embedded schema resource is read against that resource's $id: one to a document
-- the schema does not hold is remote, refused
select cqrs.register_command_type('EMBEDDED', '{"$defs": {"a": {"$id": "https://example.com/a.json", "$ref": "b.json"}}}');
\echo :LAST_ERROR_SQLSTATE
-- the validator at work
select cqrs.register_command_type('ORDER', '{
  "type": "object", "required": ["id", "lines"], "additionalProperties": false,
  "properties": {
    "id": {"type": "string", "format": "uuid"},
    "at": {"type": "string", "format": "date-time"},
    "kind": {"enum": ["web", "shop", "phone", "mail"]},
    "lines": {"type": "array", "minItems": 1, "uniqueItems": true, "items": {"$ref": "#/$defs/line"}},
    "note": {"oneOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]}
  },
  "$defs": {"line": {"type": "object", "required": ["sku"], "properties": {"sku": {"type": "string", "pattern": "^[A-Z]+$"},
            "qty": {"type": "integer", "exclusiveMinimum": 0, "multipleOf": 2}}}}
}') > 0 as registered;
select seq from cqrs.append(cqrs.uuid_v7(), 'p-1', 'ORDER', '{"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "at": "2026-02-28T12:00:00Z", "kind": "web", "lines": [{"sku": "AB", "qty": 2}], "note": null}');
select seq from cqrs.append(cqrs.uuid_v7(), 'p-1', 'ORDER', '{"id": "nope", "lines": [{"sku": "AB"}]}');
select seq from cqrs.append(cqrs.uuid_v7(), 'p-1', 'ORDER', '{"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "at": "2026-02-30T12:00:00Z", "lines": [{"sku": "AB"}]}');
select seq from cqrs.append(cqrs.uuid_v7(), 'p-1', 'ORDER', '{"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "kind": "fax", "lines": [{"sku": "ab", "qty": 3}]}');
select seq from cqrs.append(cqrs.uuid_v7(), 'p-1', 'ORDER', '{"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "lines": [{"sku": "A"}, {"sku": "A"}], "note": "long"}');
select seq from cqrs.append(cqrs.uuid_v7(), 'p-1', 'ORDER', '{"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "lines": [], "extra": 1}');
-- each schema is compiled to a function of its own; one dropped under the appends (a
-- re-registration committed meanwhile) leaves the interpreter to give the same verdict
select cqrs.register_command_type('HOSTED', '{"properties": {"ip": {"type": "string", "format": "ipv4"}}}') > 0 as registered;
select count(*) as compiled from cqrs_portable.validator v join cqrs.command_type t using (command_type, version) where v.command_type = 'HOSTED';
select pg_catalog.format('drop function cqrs_portable.%I(jsonb, jsonb, integer)', v.function) as drop_it
  from cqrs_portable.validator v where v.command_type = 'HOSTED' \gset
:drop_it;
select seq from cqrs.append(cqrs.uuid_v7(), 'h-1', 'HOSTED', '{"ip": "10.0.0.256"}');
\echo :LAST_ERROR_SQLSTATE
rollback;
