//! `GroupCommit`: a consistency group's point recorded once every member's push committed
//! (the work is `store::groups`, on a blocking thread).

use ctk::{ChangeId, Consistency, GroupCutId};
use ctk_net::wire::{Refusal, Response};
use tracing::{info, info_span};

use super::{Config, describe, refusal};
use crate::store::groups::{self, GroupPoint};

/// Records group point `group_cut` of `group` with its members' points. The group's
/// retention is its first member's (by name): the members of a group share one schedule.
pub(super) async fn commit(
    agent: &str,
    config: &Config,
    group: String,
    group_cut: GroupCutId,
    cut_unix_ms: u64,
    consistency: Consistency,
    members: Vec<(String, ChangeId)>,
) -> Response {
    let count = members.len();
    let members: std::collections::BTreeMap<String, ChangeId> = members.into_iter().collect();
    if members.len() != count {
        return Response::refused(
            Refusal::BadRequest,
            format!("group {group:?}: a disk is named twice among its members"),
        );
    }
    let root = config.store.join(agent);
    let retention = members
        .keys()
        .next()
        .map(|first| config.retention(first))
        .unwrap_or_else(|| config.retention(""));
    let span = info_span!("group_commit", %group, %group_cut);
    let result = tokio::task::spawn_blocking(move || {
        let _guard = span.enter();
        let point = GroupPoint {
            group_cut,
            cut_unix_ms,
            consistency,
            committed_unix_ms: ctk::unix_ms_now(),
            members,
        };
        let fs = ctk::vfs::RealFs;
        let already = groups::commit(&fs, &root, &group, point, &retention, ctk::unix_ms_now())?;
        info!(already, members = count, "group point committed");
        Ok::<_, crate::store::StoreError>(already)
    })
    .await;
    match result {
        Ok(Ok(already)) => Response::GroupCommitted { already },
        Ok(Err(e)) => Response::refused(refusal(&e), describe(&e)),
        Err(e) => Response::refused(Refusal::Unavailable, e.to_string()),
    }
}
