-- Both editions read a draft-07 schema alike. The portable edition says, in a WARNING, that
-- dependentRequired is not a draft-07 keyword (its expected output is in portable/expected/).
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
-- a draft-07 schema as generators write them (issue 21's new user): if/then, contains,
-- propertyNames, format ipv4, a percent-encoded $ref, and dependentRequired (not a draft-07
-- keyword: neither edition checks it there)
select cqrs.register_command_type('DEVICE', '{
  "$schema": "http://json-schema.org/draft-07/schema#",
  "type": "object", "required": ["kind"],
  "propertyNames": {"pattern": "^[a-z_]+$"},
  "properties": {
    "kind": {"enum": ["router", "sensor"]},
    "ip": {"$ref": "#/definitions/ip%20address"},
    "tags": {"type": "array", "contains": {"const": "prod"}}
  },
  "if": {"properties": {"kind": {"const": "router"}}},
  "then": {"required": ["ip"]},
  "dependentRequired": {"ip": ["tags"]},
  "definitions": {"ip address": {"type": "string", "format": "ipv4"}}
}') > 0 as registered;
select seq from cqrs.append(cqrs.uuid_v7(), 'd-1', 'DEVICE', '{"kind": "router", "ip": "10.0.0.1", "tags": ["prod"]}');
select seq from cqrs.append(cqrs.uuid_v7(), 'd-1', 'DEVICE', '{"kind": "sensor", "ip": "10.0.0.1"}');
select seq from cqrs.append(cqrs.uuid_v7(), 'd-1', 'DEVICE', '{"kind": "router"}');
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 'd-1', 'DEVICE', '{"kind": "router", "ip": "10.0.0.256"}');
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 'd-1', 'DEVICE', '{"kind": "sensor", "tags": ["dev"]}');
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 'd-1', 'DEVICE', '{"kind": "sensor", "Bad-Name": 1}');
\echo :LAST_ERROR_SQLSTATE
-- a bundled schema, alike in both editions: embedded resources ($id below the root), whose
-- $refs are read against their own base URI — "#/$defs/sku" inside line.json is line.json's
-- own, at most 3 characters, not the root's sku resource, whose anchor "code" is reached by URI
select cqrs.register_command_type('BUNDLED', '{
  "$id": "https://example.com/order.json", "type": "object", "required": ["line"],
  "properties": {"line": {"$ref": "line.json"}, "code": {"$ref": "https://example.com/refs/sku.json#code"}},
  "$defs": {
    "line": {"$id": "line.json", "type": "object", "properties": {"sku": {"$ref": "#/$defs/sku"}},
             "$defs": {"sku": {"type": "string", "maxLength": 3}}},
    "sku": {"$id": "refs/sku.json", "$defs": {"c": {"$anchor": "code", "type": "string", "pattern": "^[A-Z]+$"}}}
  }
}') > 0 as registered;
select seq from cqrs.append(cqrs.uuid_v7(), 'b-1', 'BUNDLED', '{"line": {"sku": "abc"}, "code": "AB"}');
select seq from cqrs.append(cqrs.uuid_v7(), 'b-1', 'BUNDLED', '{"line": {"sku": "ABCD"}}');
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 'b-1', 'BUNDLED', '{"line": {}, "code": "ab"}');
\echo :LAST_ERROR_SQLSTATE
-- an extensible schema, alike in both editions: list.json's items are whatever the outermost
-- resource in the dynamic scope calls "item" — here the root's tag, a string of at most 5
select cqrs.register_command_type('TAGGED', '{
  "$id": "https://example.com/tagged.json",
  "$ref": "list.json",
  "$defs": {
    "tag": {"$dynamicAnchor": "item", "type": "string", "maxLength": 5},
    "list": {"$id": "list.json", "type": "object",
             "properties": {"items": {"type": "array", "items": {"$dynamicRef": "#item"}}},
             "$defs": {"any": {"$dynamicAnchor": "item"}}}
  }
}') > 0 as registered;
select seq from cqrs.append(cqrs.uuid_v7(), 't-1', 'TAGGED', '{"items": ["ok", "fine"]}');
select seq from cqrs.append(cqrs.uuid_v7(), 't-1', 'TAGGED', '{"items": ["ok", "too long"]}');
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 't-1', 'TAGGED', '{"items": [3]}');
\echo :LAST_ERROR_SQLSTATE
rollback;
