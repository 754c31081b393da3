//! The pg_regress suite in `pgrx-tests/` against both editions (the runner:
//! `cqrs_e2e::regress`). Every file in `pgrx-tests/sql` runs against both and must produce the
//! same output; what legitimately differs lives in `pgrx-tests/<edition>/`.

use anyhow::Result;
use cqrs_e2e::edition::Edition;
use cqrs_e2e::regress;

#[test]
fn pg_regress_suite_passes_against_the_extension() -> Result<()> {
    regress::run(Edition::Extension, None)
}

#[test]
fn pg_regress_suite_passes_against_the_portable_edition() -> Result<()> {
    regress::run(Edition::Portable, None)
}
