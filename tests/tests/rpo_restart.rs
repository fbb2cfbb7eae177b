//! The RPO an agent reports survives its restart: `ctk-agent status --json` gives, per
//! replication cursor, the cut time of the receiver's newest committed point and its age,
//! from `<journal>.cursors`, kept beside the journal as the cursor moves. A cursor that
//! moved while the file did not (its save lost) gets no RPO rather than a wrong one.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn the_rpo_is_known_after_an_agent_restart_and_never_taken_from_another_cut() {
    let pair = Pair::new(50);
    let image = pair.d.join("vm1.img");
    random_image(&image, 8 << 20, 0x5e7);
    let agent = pair.serve_disk(&image);
    let (ok, out, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "replicate: {err}");
    let pushed: Value = serde_json::from_str(&out).unwrap();
    let cut_ms = pushed["cut_unix_ms"].as_u64().unwrap();
    assert_eq!(pair.cursor()["cut_unix_ms"], cut_ms);

    // SIGKILL, then a new agent on the same journal: the RPO is still that cut's age.
    drop(agent);
    let agent = pair.serve_disk(&image);
    let cursor = pair.cursor();
    assert_eq!(cursor["at"], pushed["committed"], "{cursor}");
    assert_eq!(
        cursor["cut_unix_ms"], cut_ms,
        "the cut time was lost: {cursor}"
    );
    let rpo = cursor["rpo_s"].as_f64().expect("no RPO after the restart");
    assert!((0.0..60.0).contains(&rpo), "{cursor}");

    // The saved meta no longer matches the cursor (it names an older point, as if the save
    // of a later move was lost): no RPO, not that point's.
    let journal_meta = {
        let mut p = image.clone().into_os_string();
        p.push(".ctk.cursors");
        std::path::PathBuf::from(p)
    };
    let saved = std::fs::read_to_string(&journal_meta).expect("no cursor meta beside the journal");
    let committed = pushed["committed"].as_str().unwrap();
    let (generation, _) = committed.split_once('/').unwrap();
    std::fs::write(
        &journal_meta,
        saved.replace(committed, &format!("{generation}/999")),
    )
    .unwrap();
    drop(agent);
    let agent = pair.serve_disk(&image);
    let cursor = pair.cursor();
    assert!(
        cursor["rpo_s"].is_null(),
        "an RPO from a cut the cursor is not at: {cursor}"
    );
    // And garbage in the file is ignored the same way (the agent serves on).
    std::fs::write(&journal_meta, b"{not json").unwrap();
    drop(agent);
    let _agent = pair.serve_disk(&image);
    let cursor = pair.cursor();
    assert_eq!(cursor["at"], pushed["committed"], "{cursor}");
    assert!(cursor["rpo_s"].is_null(), "{cursor}");
}
