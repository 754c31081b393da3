//! Reading read models: `cqrs.read_many` (and `cqrs.read`, which is built on it) and
//! `cqrs.changed_since` (cache warming and repair).
//!
//! A read may run the table owner's code — a domain's check in the key's cast, a row-level
//! security policy — so the rows are read as the owner, in a security-restricted operation
//! (see [`owner_rights`]), never with the caller's rights, which are the sidecar's on every
//! cache miss. Who may read is decided first, as the caller: only a role that may `select` from
//! the table; and where the table has row-level security, only a role that sees every row of it
//! anyway (its owner, a superuser or `BYPASSRLS` role, or the projector, which writes every row
//! to the cache) — for anyone else the owner's rights would lift the policies, so they read the
//! table themselves.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::errors::{column, error, null_argument, spi_error};
use crate::fmgr::{self, arg, text_arg};
use crate::owner_rights;
use crate::prepared;
use crate::projection_catalog::{self, Definition};

/// May the current user read this read model through pg_cqrs (a kept statement: `$1` the table).
const MAY_READ: &str = "\
select pg_catalog.has_table_privilege(c.oid, 'select'),
       not c.relrowsecurity
       or pg_catalog.pg_has_role(c.relowner, 'member')
       or r.rolsuper or r.rolbypassrls
       or pg_catalog.pg_has_role('cqrs_projector', 'member'),
       current_user::text, pg_catalog.quote_ident(current_user)
  from pg_catalog.pg_class c, pg_catalog.pg_roles r
 where c.oid = $1 and r.rolname = current_user";

/// A read-model row: its key, its revision (none for a missing row) and the row as json.
type Row = (String, Option<i64>, Option<pg_sys::Datum>);

/// Refuses (42501) a caller who may not read `def`'s table through pg_cqrs.
fn check_reader(client: &mut SpiClient<'_>, def: &Definition) -> Result<(), ErrorReport> {
    let plan = prepared::statement(client, MAY_READ, &[PgBuiltInOids::OIDOID.into()])?;
    let rows = client
        .select(&*plan, Some(1), &[def.relid.into()])
        .map_err(|e| spi_error("checking who may read the read model", e))?;
    let row = rows.first();
    let may_select = column(row.get::<bool>(1), "the select privilege")?.unwrap_or(false);
    let sees_every_row = column(row.get::<bool>(2), "row-level security")?.unwrap_or(false);
    let role = column(row.get::<String>(3), "the role")?.unwrap_or_default();
    let role_ident = column(row.get::<String>(4), "the role")?.unwrap_or_default();
    if !may_select {
        return Err(error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "permission denied for the read model of projection {} (table {})",
                def.name, def.target.table
            ),
        )
        .set_hint(format!(
            "Its owner grants it: grant select on {} to {role_ident};",
            def.target.table
        )));
    }
    if !sees_every_row {
        return Err(error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "table {} has row-level security, which pg_cqrs cannot apply to role {role}: it reads read models as their owner",
                def.target.table
            ),
        )
        .set_hint("Select from the table yourself, so that its policies apply to you."));
    }
    Ok(())
}

/// The rows `plan` returns for `args`, read as `def`'s owner after checking the caller: each
/// `(key, rev, doc)`, `doc` copied out of SPI's memory.
fn read_as_owner(
    client: &mut SpiClient<'_>,
    def: &Definition,
    which: &str,
    sql: fn(&cqrs_projection::sql::Target) -> String,
    args: (&[PgOid], Vec<pgrx::datum::DatumWithOid<'static>>),
    columns: (usize, usize, usize),
) -> Result<Vec<Row>, ErrorReport> {
    check_reader(client, def)?;
    let plan = def.statement(client, which, sql, args.0)?;
    owner_rights::as_owner(def.owner, || {
        let mut table = prepared::index_plans(|| client.select(&*plan, None, &args.1))
            .map_err(|e| spi_error("reading rows", e))?;
        let mut rows = Vec::new();
        while table.next().is_some() {
            let key = column(table.get::<String>(columns.0), "a key")?.unwrap_or_default();
            let rev = column(table.get::<i64>(columns.1), "a revision")?;
            // SAFETY: a json Datum of the current SPI result, copied out of SPI's memory.
            let doc = table
                .get_datum_by_ordinal(columns.2)
                .map_err(|e| spi_error("reading a row", e))?
                .map(|d| unsafe { pg_sys::SPI_datumTransfer(d, false, -1) });
            rows.push((key, rev, doc));
        }
        Ok(rows)
    })
}

/// Returns `(key text, rev bigint, doc json)` rows.
///
/// # Safety
/// `fcinfo` must be the call info of a set-returning function with those result columns.
unsafe fn return_rows(
    fcinfo: pg_sys::FunctionCallInfo,
    rows: Vec<(String, i64, Option<pg_sys::Datum>)>,
) -> pg_sys::Datum {
    let null = pg_sys::Datum::from(0);
    // SAFETY: per the contract: text, bigint and json Datums.
    unsafe {
        fmgr::return_set(fcinfo, rows, |(key, rev, doc)| {
            (
                [
                    key.as_str().into_datum().unwrap_or(null),
                    pg_sys::Datum::from(rev),
                    doc.unwrap_or(null),
                ],
                [false, false, doc.is_none()],
            )
        })
    }
}

fmgr::v1_function!(pg_finfo_cqrs_read_many);

/// `cqrs.read_many(projection text, keys text[])`.
///
/// # Safety
/// Called by the function manager with the call info of that function.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn cqrs_read_many(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: argument 0 is text, argument 1 text[].
    let (projection, keys) = unsafe {
        (
            text_arg(fcinfo, 0),
            arg(fcinfo, 1).and_then(|d| Vec::<Option<String>>::from_datum(d, false)),
        )
    };
    let Some(projection) = projection else {
        fmgr::raise(null_argument("projection"));
    };
    let Some(keys) = keys else {
        fmgr::raise(null_argument("keys"));
    };
    let keys: Vec<String> = keys.into_iter().flatten().collect();
    let rows = Spi::connect_mut(|client| {
        let def = projection_catalog::load(client, &projection, None)?;
        let revision = client
            .select(
                "select s.revision from cqrs.projection_state s where s.name = $1",
                Some(1),
                &[projection.as_str().into()],
            )
            .and_then(|rows| rows.first().get_one::<i64>())
            .map_err(|e| spi_error("reading the projection's revision", e))?
            .unwrap_or(0);
        let read = read_as_owner(
            client,
            &def,
            "read",
            cqrs_projection::sql::Target::read_sql,
            (&[PgBuiltInOids::TEXTARRAYOID.into()], vec![keys.into()]),
            (2, 3, 4),
        )?;
        // each canonical key once, in the order asked; a missing row has the projection's revision
        let mut seen = std::collections::HashSet::new();
        Ok::<_, ErrorReport>(
            read.into_iter()
                .filter(|(key, _, _)| seen.insert(key.clone()))
                .map(|(key, rev, doc)| (key, rev.unwrap_or(revision), doc))
                .collect(),
        )
    });
    let rows = fmgr::or_raise(rows);
    // SAFETY: cqrs.read_many returns (key text, rev bigint, doc json).
    unsafe { return_rows(fcinfo, rows) }
}

fmgr::v1_function!(pg_finfo_cqrs_changed_since);

/// `cqrs.changed_since(projection text, after bigint)`: the rows whose revision is above `after`
/// (every row for -1 or null).
///
/// # Safety
/// Called by the function manager with the call info of that function.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn cqrs_changed_since(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: argument 0 is text, argument 1 bigint (by value).
    let (projection, after) = unsafe { (text_arg(fcinfo, 0), arg(fcinfo, 1).map(|d| d.value() as i64)) };
    let Some(projection) = projection else {
        fmgr::raise(null_argument("projection"));
    };
    let after = after.unwrap_or(-1);
    let rows = Spi::connect_mut(|client| {
        let def = projection_catalog::load(client, &projection, None)?;
        let read = read_as_owner(
            client,
            &def,
            "changed_since",
            cqrs_projection::sql::Target::changed_since_sql,
            (&[PgBuiltInOids::INT8OID.into()], vec![after.into()]),
            (1, 2, 3),
        )?;
        Ok::<_, ErrorReport>(
            read.into_iter()
                .map(|(key, rev, doc)| (key, rev.unwrap_or(0), doc))
                .collect(),
        )
    });
    let rows = fmgr::or_raise(rows);
    // SAFETY: cqrs.changed_since returns (key text, rev bigint, doc json).
    unsafe { return_rows(fcinfo, rows) }
}
