//! Not a kind one submits: what a job of a kind this statelyd does not know reads as (one a
//! newer version recorded on a shared ledger), so it can still be listed, shown and watched.
//! It cannot be planned, so no node of this version runs it; its own node (of the newer
//! version) does.

use super::{Moment, Planned};
use crate::step::{Env, Error};
use serde::{Deserialize, Serialize};

/// A job of a kind this statelyd does not know.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The kind's name, as the ledger has it.
    pub kind: String,
}

/// Refuses: this version cannot run a kind it does not know.
pub(crate) async fn plan(spec: &Spec, _env: &Env, _at: Moment) -> Result<Planned, Error> {
    Err(Error::FailedPrecondition(format!(
        "this statelyd does not know jobs of kind {} (a newer version's)",
        crate::quote::quote(&spec.kind)
    )))
}
