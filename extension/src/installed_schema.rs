//! What the installed SQL has, where releases differ. One library serves every release's install
//! until `ALTER EXTENSION pg_cqrs UPDATE` runs (a server gets the new library first, and updates
//! its databases while it runs), so a statement that touches a column a later release added
//! asks for the column first, on the rare paths that need it.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::spi::SpiClient;

use crate::errors::spi_error;

/// Whether whole errors are kept apart from their summaries (0.3.0 and later:
/// `projection_state.last_error_detail` and `dead_letter.error_detail`). Asked each time, not
/// cached: an `ALTER EXTENSION … UPDATE` may have run in this session since. Before 0.3.0 only
/// the summary is recorded (the whole error may hold a command's values, and those releases'
/// `last_error` is readable by readers).
pub(crate) fn keeps_error_details(client: &SpiClient<'_>) -> Result<bool, ErrorReport> {
    client
        .select(
            "select exists (select from pg_catalog.pg_attribute a
                             where a.attrelid = 'cqrs.projection_state'::pg_catalog.regclass
                               and a.attname = 'last_error_detail' and not a.attisdropped)",
            Some(1),
            &[],
        )
        .and_then(|rows| rows.first().get::<bool>(1))
        .map(|kept| kept.unwrap_or(false))
        .map_err(|err| spi_error("reading which release's tables are installed", err))
}
