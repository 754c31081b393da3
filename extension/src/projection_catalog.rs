//! Projection definitions: `cqrs.create_projection()` checks a definition against the catalog
//! and registers it; [`load`] gives the projector a definition with its statements, cached per
//! backend until the definition or the target table changes.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use cqrs_projection::spec::{Handler, Program, Source, Spec};
use cqrs_projection::sql::{quote_ident, Column, JsonKind, Target};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::JsonB;

use crate::errors::{column, error, internal, spi_error};
use crate::owner_rights;
use crate::prepared;
use crate::subtransaction;

/// What to do when a handler fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnError {
    Halt,
    DeadLetter,
}

impl OnError {
    /// From `cqrs.projection.on_error` ('halt' or 'dead_letter', checked at registration).
    fn from_setting(setting: &str) -> Self {
        match setting {
            "dead_letter" => OnError::DeadLetter,
            _ => OnError::Halt,
        }
    }
}

/// The statements of a definition, prepared on first use and kept for the backend's life.
#[derive(Default)]
pub(crate) struct Statements {
    kept: HashMap<String, Rc<OwnedPreparedStatement>>,
}

/// A loaded projection definition.
pub(crate) struct Definition {
    pub(crate) name: String,
    pub(crate) program: Program,
    pub(crate) target: Target,
    /// The target table.
    pub(crate) relid: pg_sys::Oid,
    /// The target table's owner: read-model writes and handlers run as this role.
    pub(crate) owner: pg_sys::Oid,
    pub(crate) on_error: OnError,
    statements: RefCell<Statements>,
}

impl Definition {
    /// A definition compiled from `spec` for `target` (table `relid`, owned by `owner`), with
    /// no statement prepared yet: at creation and when loaded from the catalog.
    fn new(
        name: &str,
        spec: &Spec,
        target: Target,
        relid: pg_sys::Oid,
        owner: pg_sys::Oid,
        on_error: OnError,
    ) -> Self {
        Self {
            name: name.to_owned(),
            program: spec.compile(),
            target,
            relid,
            owner,
            on_error,
            statements: RefCell::new(Statements::default()),
        }
    }

    /// The kept statement `which`, prepared from `sql` with `args` types the first time. The
    /// cache is not borrowed while the caller executes it.
    pub(crate) fn statement(
        &self,
        client: &SpiClient<'_>,
        which: &str,
        sql: impl FnOnce(&Target) -> String,
        args: &[PgOid],
    ) -> Result<Rc<OwnedPreparedStatement>, ErrorReport> {
        if let Some(kept) = self.statements.borrow().kept.get(which).cloned() {
            return Ok(kept);
        }
        let text = sql(&self.target);
        let prepared = client.prepare_mut(text.as_str(), args).map_err(|err| {
            spi_error(
                &format!("preparing the {which} statement of projection {}", self.name),
                err,
            )
        })?;
        let prepared = Rc::new(prepared.keep());
        self.statements
            .borrow_mut()
            .kept
            .insert(which.to_owned(), Rc::clone(&prepared));
        Ok(prepared)
    }
}

/// (definition version, target table's pg_class xmin, definition)
type Cached = (i64, String, Rc<Definition>);

thread_local! {
    /// name → cached definition
    static DEFINITIONS: RefCell<HashMap<String, Cached>> = RefCell::new(HashMap::new());
}

/// A column of the target as the catalog describes it.
struct CatalogColumn {
    sql_type: String,
    type_oid: pg_sys::Oid,
    default: Option<String>,
    /// generated or identity-always: cannot be written
    generated: bool,
}

struct CatalogTable {
    qualified: String,
    owner: pg_sys::Oid,
    columns: BTreeMap<String, CatalogColumn>,
    /// column names in attnum order
    order: Vec<String>,
}

fn read_table(client: &SpiClient<'_>, target: pg_sys::Oid) -> Result<CatalogTable, ErrorReport> {
    let rows = client
        .select(
            "select n.nspname::text, c.relname::text, c.relkind::text, c.relowner
               from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
              where c.oid = $1",
            Some(1),
            &[target.into()],
        )
        .map_err(|err| spi_error("reading the target table", err))?;
    let mut found = None;
    for row in rows {
        let schema = column(row.get::<String>(1), "nspname")?.unwrap_or_default();
        let table = column(row.get::<String>(2), "relname")?.unwrap_or_default();
        let kind = column(row.get::<String>(3), "relkind")?.unwrap_or_default();
        let owner = column(row.get::<pg_sys::Oid>(4), "relowner")?.unwrap_or(pg_sys::InvalidOid);
        found = Some((schema, table, kind, owner));
    }
    let Some((schema, table, kind, owner)) = found else {
        return Err(error(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("the target table (oid {}) does not exist", target.to_u32()),
        ));
    };
    if kind != "r" && kind != "p" {
        return Err(error(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("{schema}.{table} is not a table; a read model must be a table"),
        ));
    }
    if schema == "cqrs" {
        return Err(error(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("{schema}.{table} is part of pg_cqrs; a read model is a table of your own"),
        ));
    }
    // type names as the statements will name them: qualified unless in pg_catalog, since the
    // statements run with search_path = pg_catalog, pg_temp (see owner_rights)
    let rows = prepared::with_settings(&[(c"search_path", c"pg_catalog, pg_temp")], || {
        client.select(
            "select a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypid,
                    pg_catalog.pg_get_expr(d.adbin, d.adrelid),
                    a.attgenerated <> '' or a.attidentity = 'a'
               from pg_catalog.pg_attribute a
               left join pg_catalog.pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
              where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped
              order by a.attnum",
            None,
            &[target.into()],
        )
    })
    .map_err(|err| spi_error("reading the target's columns", err))?;
    let mut columns = BTreeMap::new();
    let mut order = Vec::new();
    for row in rows {
        let name = column(row.get::<String>(1), "attname")?.unwrap_or_default();
        let column = CatalogColumn {
            sql_type: column(row.get::<String>(2), "the type")?.unwrap_or_default(),
            type_oid: column(row.get::<pg_sys::Oid>(3), "atttypid")?.unwrap_or(pg_sys::InvalidOid),
            default: column(row.get::<String>(4), "the default")?,
            generated: column(row.get::<bool>(5), "attgenerated")?.unwrap_or(false),
        };
        order.push(name.clone());
        columns.insert(name, column);
    }
    Ok(CatalogTable {
        qualified: format!("{}.{}", quote_ident(&schema), quote_ident(&table)),
        owner,
        columns,
        order,
    })
}

fn json_kind(type_oid: pg_sys::Oid) -> JsonKind {
    if type_oid == pg_sys::JSONBOID {
        JsonKind::Jsonb
    } else if type_oid == pg_sys::JSONOID {
        JsonKind::Json
    } else {
        JsonKind::No
    }
}

fn is_numeric(type_oid: pg_sys::Oid) -> bool {
    [
        pg_sys::INT2OID,
        pg_sys::INT4OID,
        pg_sys::INT8OID,
        pg_sys::FLOAT4OID,
        pg_sys::FLOAT8OID,
        pg_sys::NUMERICOID,
    ]
    .contains(&type_oid)
}

/// Builds the statement target from the table as the catalog describes it (read once, by
/// [`read_table`]); [`check_definition`] adds the checks made at creation.
fn build_target(
    table: &CatalogTable,
    key_column: &str,
    rev_column: &str,
    spec: &Spec,
) -> Result<Target, ErrorReport> {
    let Some(key) = table.columns.get(key_column) else {
        return Err(error(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!(
                "table {} has no column {key_column:?} (the key column)",
                table.qualified
            ),
        ));
    };
    let Some(rev) = table.columns.get(rev_column) else {
        return Err(error(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("table {} has no revision column {rev_column:?}", table.qualified),
        )
        .set_hint(format!(
            "Every read-model row carries a revision that only grows: alter table {} add column {} bigint not null default 0;",
            table.qualified,
            quote_ident(rev_column)
        )));
    };
    if rev.type_oid != pg_sys::INT8OID {
        return Err(error(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "the revision column {rev_column:?} is {}, it must be bigint",
                rev.sql_type
            ),
        ));
    }
    let uses = spec.columns();
    let mut columns = Vec::new();
    for (name, uses) in &uses {
        let Some(column) = table.columns.get(name) else {
            return Err(error(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!(
                    "table {} has no column {name:?}, which the handlers write",
                    table.qualified
                ),
            ));
        };
        columns.push(Column {
            name: name.clone(),
            sql_type: column.sql_type.clone(),
            json: json_kind(column.type_oid),
            default: column.default.clone(),
            uses: *uses,
        });
    }
    let other_columns = table
        .order
        .iter()
        .filter(|name| {
            name.as_str() != key_column
                && name.as_str() != rev_column
                && !uses.contains_key(name.as_str())
                && table.columns.get(name.as_str()).is_some_and(|c| !c.generated)
        })
        .cloned()
        .collect();
    Ok(Target {
        table: table.qualified.clone(),
        key: key_column.to_owned(),
        key_type: key.sql_type.clone(),
        rev: rev_column.to_owned(),
        columns,
        other_columns,
    })
}

/// Whether `select <probe>` runs without error (a cast that exists and accepts the value). The
/// cast may run the table owner's code — a domain's check, a cast function — so it runs as the
/// owner (see [`owner_rights`]), never as whoever creates the projection.
fn probe_cast(
    owner: pg_sys::Oid,
    sql: &str,
    args: Vec<pgrx::datum::DatumWithOid<'static>>,
) -> Result<(), subtransaction::Failure> {
    subtransaction::run(|| {
        owner_rights::as_owner(owner, || {
            Spi::connect(|client| {
                client
                    .select(sql, Some(1), &args)
                    .map(|_| ())
                    .map_err(|err| spi_error("checking a cast", err))
            })
        })
    })
}

/// The checks made when a projection is created, beyond what the statements need.
// Long but flat: one check after another, in the order their errors are documented.
fn check_definition(
    client: &SpiClient<'_>,
    target: pg_sys::Oid,
    key_column: &str,
    rev_column: &str,
    spec: &Spec,
) -> Result<(Target, pg_sys::Oid), ErrorReport> {
    let table = read_table(client, target)?;
    let built = build_target(&table, key_column, rev_column, spec)?;
    let owner = table.owner;
    check_function_owners(client, spec, owner)?;

    // ON CONFLICT (key) needs a unique, non-partial index on exactly the key column
    let unique = client
        .select(
            "select exists (
                 select from pg_catalog.pg_index i
                  where i.indrelid = $1 and i.indisunique and i.indisvalid and i.indnkeyatts = 1
                    and i.indpred is null and i.indexprs is null
                    and i.indkey[0] = (select a.attnum from pg_catalog.pg_attribute a
                                        where a.attrelid = $1 and a.attname = $2::name and not a.attisdropped))",
            Some(1),
            &[target.into(), key_column.into()],
        )
        .and_then(|rows| rows.first().get_one::<bool>())
        .map_err(|err| spi_error("looking for a unique index on the key", err))?;
    if unique != Some(true) {
        return Err(error(
            PgSqlErrorCode::ERRCODE_INVALID_COLUMN_REFERENCE,
            format!(
                "table {} has no unique index on ({}) alone",
                built.table,
                quote_ident(key_column)
            ),
        )
        .set_hint(format!(
            "Make the key column the primary key, or: create unique index on {} ({});",
            built.table,
            quote_ident(key_column)
        )));
    }
    if table.columns.get(key_column).is_some_and(|c| c.generated) {
        return Err(error(
            PgSqlErrorCode::ERRCODE_GENERATED_ALWAYS,
            format!("the key column {key_column:?} is generated; pg_cqrs must be able to write it"),
        ));
    }

    for (at, action) in spec.actions() {
        check_source(&format!("{at}.key"), &action.key, key_column, &table)?;
        for (column, source) in action.set.iter().chain(action.add.iter()) {
            let part = if action.add.iter().any(|(c, _)| c == column) {
                "add"
            } else {
                "set"
            };
            let at = format!("{at}.{part}.{column}");
            if column == key_column {
                return Err(error(
                    PgSqlErrorCode::ERRCODE_INVALID_COLUMN_REFERENCE,
                    format!("{at}: the key column is written from \"key\", not from set/add"),
                ));
            }
            if column == rev_column {
                return Err(error(
                    PgSqlErrorCode::ERRCODE_INVALID_COLUMN_REFERENCE,
                    format!("{at}: the revision column is maintained by pg_cqrs"),
                ));
            }
            let Some(catalog) = table.columns.get(column.as_str()) else {
                return Err(error(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                    format!("{at}: table {} has no column {column:?}", built.table),
                ));
            };
            if catalog.generated {
                return Err(error(
                    PgSqlErrorCode::ERRCODE_GENERATED_ALWAYS,
                    format!("{at}: column {column:?} is generated and cannot be written"),
                ));
            }
            if part == "add" && !is_numeric(catalog.type_oid) {
                return Err(error(
                    PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                    format!(
                        "{at}: \"add\" needs a numeric column; {column:?} is {}",
                        catalog.sql_type
                    ),
                ));
            }
            check_source(&at, source, column, &table)?;
        }
    }
    Ok((built, owner))
}

/// The projection writes the table as its owner: only the owner (or a member of its role) may
/// make it a read model. Checked first, before anything else is looked up.
fn check_owner(client: &SpiClient<'_>, target: pg_sys::Oid) -> Result<(), ErrorReport> {
    // the table's name schema-qualified whatever the caller's search_path, as in the portable edition
    let rows = prepared::with_settings(&[(c"search_path", c"pg_catalog, pg_temp")], || {
        client.select(
            "select pg_catalog.pg_has_role(c.relowner, 'MEMBER'), c.relowner::pg_catalog.regrole::text,
                    c.oid::pg_catalog.regclass::text
               from pg_catalog.pg_class c where c.oid = $1",
            Some(1),
            &[target.into()],
        )
    })
    .map_err(|err| spi_error("checking the table's owner", err))?;
    for row in rows {
        if column(row.get::<bool>(1), "membership")? != Some(true) {
            let owner = column(row.get::<String>(2), "relowner")?.unwrap_or_default();
            let table = column(row.get::<String>(3), "the table")?.unwrap_or_default();
            return Err(error(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("only the owner of {table} (role {owner}) or a member of that role can make it a read model"),
            )
            .set_hint("Projections write their read model with its owner's rights."));
        }
    }
    Ok(())
}

/// Function handlers run as the table's owner: each must be owned by that role or one it is a
/// member of, so that no other role's code runs with the owner's rights.
fn check_function_owners(
    client: &SpiClient<'_>,
    spec: &Spec,
    table_owner: pg_sys::Oid,
) -> Result<(), ErrorReport> {
    for function in spec.functions() {
        let rows = client
            .select(
                "select pg_catalog.pg_has_role($2, p.proowner, 'MEMBER'), p.proowner::pg_catalog.regrole::text,
                        $2::pg_catalog.regrole::text
                   from pg_catalog.pg_proc p where p.oid = pg_catalog.to_regprocedure($1 || '(jsonb)')",
                Some(1),
                &[function.into(), table_owner.into()],
            )
            .map_err(|err| spi_error("checking a handler function's owner", err))?;
        for row in rows {
            let allowed = column(row.get::<bool>(1), "membership")?.unwrap_or(false);
            if !allowed {
                let function_owner = column(row.get::<String>(2), "proowner")?.unwrap_or_default();
                let owner = column(row.get::<String>(3), "relowner")?.unwrap_or_default();
                return Err(error(
                    PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                    format!("handler function {function}(jsonb) is owned by role {function_owner}, not by the read model's owner {owner} or a role it is a member of"),
                )
                .set_hint(format!("Handlers run as the table's owner: alter function {function}(jsonb) owner to {owner};")));
            }
        }
    }
    Ok(())
}

/// Checks that a constant or command-log field can be stored in `column` (a path's value can
/// only be checked when an event arrives).
fn check_source(at: &str, source: &Source, column: &str, table: &CatalogTable) -> Result<(), ErrorReport> {
    let Some(catalog) = table.columns.get(column) else {
        return Ok(());
    };
    let kind = json_kind(catalog.type_oid);
    match source {
        Source::Const(value) if kind == JsonKind::No && !value.is_null() => {
            if value.is_array() || value.is_object() {
                return Err(error(
                    PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                    format!(
                        "{at}: a JSON {} constant cannot be stored in column {column:?} of type {}",
                        cqrs_projection::event::json_type(value),
                        catalog.sql_type
                    ),
                ));
            }
            let sql = format!(
                "select (pg_catalog.jsonb_build_array($1::jsonb) ->> 0)::{}",
                catalog.sql_type
            );
            probe_cast(table.owner, &sql, vec![JsonB(value.clone()).into()]).map_err(|failure| {
                error(
                    PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                    format!(
                        "{at}: the constant {value} cannot be stored in column {column:?} of type {}: {}",
                        catalog.sql_type, failure.message
                    ),
                )
            })
        }
        Source::Field(field) if kind == JsonKind::No => {
            let sql = format!("select null::{}::{}", field.sql_type(), catalog.sql_type);
            probe_cast(table.owner, &sql, Vec::new()).map_err(|failure| {
                error(
                    PgSqlErrorCode::ERRCODE_CANNOT_COERCE,
                    format!("{at}: the command-log field {} ({}) cannot be stored in column {column:?} of type {}: {}",
                        field.name(), field.sql_type(), catalog.sql_type, failure.message),
                )
            })
        }
        _ => Ok(()),
    }
}

/// Resolves every function handler to its schema-qualified, quoted name, checking its signature:
/// `(jsonb) returns setof text` (the keys of the rows it changed).
fn resolve_functions(client: &SpiClient<'_>, spec: &mut Spec) -> Result<(), ErrorReport> {
    let mut resolved: HashMap<String, String> = HashMap::new();
    for name in spec.functions() {
        let rows = client
            .select(
                "select n.nspname::text, p.proname::text, p.proretset, p.prorettype = 'pg_catalog.text'::pg_catalog.regtype
                   from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace
                  where p.oid = pg_catalog.to_regprocedure($1 || '(jsonb)')",
                Some(1),
                &[name.into()],
            )
            .map_err(|err| spi_error("looking up a handler function", err))?;
        let mut found = None;
        for row in rows {
            found = Some((
                column(row.get::<String>(1), "nspname")?.unwrap_or_default(),
                column(row.get::<String>(2), "proname")?.unwrap_or_default(),
                column(row.get::<bool>(3), "proretset")?.unwrap_or(false),
                column(row.get::<bool>(4), "prorettype")?.unwrap_or(false),
            ));
        }
        let Some((schema, function, returns_set, returns_text)) = found else {
            return Err(error(
                PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION,
                format!("handler function {name}(jsonb) does not exist"),
            )
            .set_hint("A handler function takes the event as jsonb and returns setof text: the keys of the rows it changed."));
        };
        if !(returns_set && returns_text) {
            return Err(error(
                PgSqlErrorCode::ERRCODE_INVALID_FUNCTION_DEFINITION,
                format!("handler function {schema}.{function}(jsonb) must return setof text (the keys of the rows it changed)"),
            ));
        }
        resolved.insert(
            name.to_owned(),
            format!("{}.{}", quote_ident(&schema), quote_ident(&function)),
        );
    }
    for handlers in spec.handlers.values_mut() {
        for handler in handlers.iter_mut() {
            if let Handler::Function(name) = handler {
                if let Some(qualified) = resolved.get(name.as_str()) {
                    *name = qualified.clone();
                }
            }
        }
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), ErrorReport> {
    if cqrs_projection::name::is_valid(name) {
        Ok(())
    } else {
        Err(error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("projection name {name:?} must be {}", cqrs_projection::name::RULE),
        )
        .set_hint("Names appear in cache keys and metric labels."))
    }
}

/// A registered read-model table.
pub(crate) struct NewProjection<'a> {
    pub(crate) name: &'a str,
    pub(crate) target: pg_sys::Oid,
    pub(crate) key_column: &'a str,
    pub(crate) handlers: &'a serde_json::Value,
    pub(crate) on_error: &'a str,
    pub(crate) rev_column: &'a str,
}

/// Checks and registers a projection (without backfilling it).
pub(crate) fn register(new: &NewProjection<'_>) -> Result<(), ErrorReport> {
    check_name(new.name)?;
    let on_error = match new.on_error {
        "halt" | "dead_letter" => new.on_error,
        other => {
            return Err(error(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("on_error must be 'halt' or 'dead_letter', not {other:?}"),
            ))
        }
    };
    let mut spec = Spec::parse(new.handlers)
        .map_err(|err| error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, err.to_string()))?;
    Spi::connect_mut(|client| {
        check_owner(client, new.target)?;
        let exists = client
            .select(
                "select (select p.name from cqrs.projection p where p.name = $1),
                        (select p.name from cqrs.projection p where p.target = $2::pg_catalog.oid::pg_catalog.regclass)",
                Some(1),
                &[new.name.into(), new.target.into()],
            )
            .and_then(|rows| rows.first().get_two::<String, String>())
            .map_err(|err| spi_error("looking for existing projections", err))?;
        if exists.0.is_some() {
            return Err(error(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                format!("projection {:?} already exists", new.name),
            )
            .set_hint("Drop it first with cqrs.drop_projection(), or choose another name."));
        }
        if let Some(other) = exists.1 {
            return Err(error(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                format!("that table is already the read model of projection {other:?}"),
            ));
        }
        resolve_functions(client, &mut spec)?;
        let (target, owner) = check_definition(client, new.target, new.key_column, new.rev_column, &spec)?;
        client
            .update(
                "insert into cqrs.projection (name, target, key_column, rev_column, handlers, on_error)
                 values ($1, $2::pg_catalog.oid::pg_catalog.regclass, $3, $4, $5, $6)",
                None,
                &[
                    new.name.into(),
                    new.target.into(),
                    new.key_column.into(),
                    new.rev_column.into(),
                    JsonB(spec.to_json()).into(),
                    on_error.into(),
                ],
            )
            .map_err(|err| spi_error("registering the projection", err))?;
        client
            .update(
                "insert into cqrs.projection_state (name) values ($1)",
                None,
                &[new.name.into()],
            )
            .map_err(|err| spi_error("registering the projection state", err))?;
        grant_projector(client, new.target, &target.table)?;
        warn_unregistered(client, &spec)?;
        // Hand the compiled definition on: the backfill, and this session's batches, use it
        // without parsing the handlers or reading the catalog again. The table version is read
        // after the grant, which changed the table's catalog row.
        let (version, relation_version) = client
            .select(
                "select p.definition_version, c.xmin::text
                   from cqrs.projection p join pg_catalog.pg_class c on c.oid = p.target where p.name = $1",
                Some(1),
                &[new.name.into()],
            )
            .and_then(|rows| rows.first().get_two::<i64, String>())
            .map_err(|err| spi_error("reading the new projection's version", err))?;
        if let (Some(version), Some(relation_version)) = (version, relation_version) {
            remember(
                version,
                relation_version,
                Definition::new(
                    new.name,
                    &spec,
                    target,
                    new.target,
                    owner,
                    OnError::from_setting(on_error),
                ),
            );
        }
        Ok(())
    })
}

/// The projector writes a read model as its owner (owner_rights), and reads it to fill and
/// repair caches: it needs select on it (and usage on its schema), and nothing more. A grant
/// that fails is a NOTICE: the owner can grant it.
fn grant_projector(client: &mut SpiClient<'_>, target: pg_sys::Oid, table: &str) -> Result<(), ErrorReport> {
    let schema = client
        .select(
            "select n.nspname::text from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace where c.oid = $1",
            Some(1),
            &[target.into()],
        )
        .and_then(|rows| rows.first().get_one::<String>())
        .map_err(|err| spi_error("reading the target's schema", err))?
        .unwrap_or_default();
    let grant = format!(
        "grant usage on schema {} to cqrs_projector; grant select on {} to cqrs_projector",
        quote_ident(&schema),
        table
    );
    if let Err(failure) = subtransaction::run(|| {
        Spi::run(&grant).map_err(|err| spi_error("granting the projector access", err))
    }) {
        pgrx::notice!(
            "could not grant cqrs_projector select on {} ({}); grant it yourself, and select to the roles that read it",
            table,
            failure.message
        );
    }
    Ok(())
}

/// Warns of handlers of command types that are not registered while
/// `cqrs.require_registered_types` refuses such commands: a misspelt type (`BORROW_BOK`) would
/// otherwise wait for commands that can never come, in silence.
fn warn_unregistered(client: &SpiClient<'_>, spec: &Spec) -> Result<(), ErrorReport> {
    if !crate::settings::REQUIRE_REGISTERED_TYPES.get() {
        return Ok(());
    }
    let types: Vec<String> = spec.handlers.keys().cloned().collect();
    let rows = client
        .select(
            "select t from unnest($1::text[]) as u(t)
              where not exists (select from cqrs.command_type c where c.command_type = u.t) order by u.t collate \"C\"",
            None,
            &[types.into()],
        )
        .map_err(|err| spi_error("looking up the handled command types", err))?;
    for row in rows {
        if let Some(command_type) = column(row.get::<String>(1), "a command type")? {
            pgrx::warning!(
                "handlers.{command_type}: command type {command_type:?} is not registered and cqrs.require_registered_types refuses its commands: this handler runs only once it is registered"
            );
        }
    }
    Ok(())
}

/// Keeps `definition` in this backend's cache, for its version and its table's version.
fn remember(version: i64, relation_version: String, definition: Definition) -> Rc<Definition> {
    let definition = Rc::new(definition);
    DEFINITIONS.with_borrow_mut(|cache| {
        cache.insert(
            definition.name.clone(),
            (version, relation_version, Rc::clone(&definition)),
        );
    });
    definition
}

/// The definition of projection `name` (cached; reloaded when it or its table changed). With
/// `known` — the definition version and the table's pg_class xmin, when the caller already read
/// them — a cached definition is returned without a query.
pub(crate) fn load(
    client: &SpiClient<'_>,
    name: &str,
    known: Option<(i64, &str)>,
) -> Result<Rc<Definition>, ErrorReport> {
    if let Some((version, relation_version)) = known {
        let cached = DEFINITIONS.with_borrow(|cache| {
            cache
                .get(name)
                .filter(|(v, rel, _)| *v == version && rel == relation_version)
                .map(|(_, _, definition)| Rc::clone(definition))
        });
        if let Some(definition) = cached {
            return Ok(definition);
        }
    }
    let rows = client
        .select(
            "select p.definition_version, c.xmin::text, p.target::pg_catalog.oid, p.key_column::text,
                    p.rev_column::text, p.handlers, p.on_error
               from cqrs.projection p join pg_catalog.pg_class c on c.oid = p.target
              where p.name = $1",
            Some(1),
            &[name.into()],
        )
        .map_err(|err| spi_error("loading the projection definition", err))?;
    if rows.is_empty() {
        return Err(error(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("projection {name:?} does not exist, or its read-model table was dropped"),
        ));
    }
    let row = rows.first();
    let version = column(row.get::<i64>(1), "definition_version")?;
    let relation_version = column(row.get::<String>(2), "the table version")?.unwrap_or_default();
    let Some(version) = version else {
        return Err(error(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("projection {name:?} does not exist, or its read-model table was dropped"),
        ));
    };
    let cached = DEFINITIONS.with_borrow(|cache| {
        cache
            .get(name)
            .filter(|(v, rel, _)| *v == version && *rel == relation_version)
            .map(|(_, _, definition)| Rc::clone(definition))
    });
    if let Some(definition) = cached {
        return Ok(definition);
    }
    let target_oid = column(row.get::<pg_sys::Oid>(3), "target")?.unwrap_or(pg_sys::InvalidOid);
    let key_column = column(row.get::<String>(4), "key_column")?.unwrap_or_default();
    let rev_column = column(row.get::<String>(5), "rev_column")?.unwrap_or_default();
    let handlers = column(row.get::<JsonB>(6), "handlers")?
        .map(|j| j.0)
        .unwrap_or_default();
    let on_error = OnError::from_setting(
        column(row.get::<String>(7), "on_error")?
            .as_deref()
            .unwrap_or("halt"),
    );
    let spec = Spec::parse(&handlers)
        .map_err(|err| internal(format!("stored handlers of {name:?} do not parse: {err}")))?;
    let table = read_table(client, target_oid)?;
    let target = build_target(&table, &key_column, &rev_column, &spec)?;
    let owner = table.owner;
    Ok(remember(
        version,
        relation_version,
        Definition::new(name, &spec, target, target_oid, owner, on_error),
    ))
}
