//! The dependency rules of ARCHITECTURE.md, checked on the workspace's manifests (`cargo
//! metadata`): the library depends on no crate of the workspace; the agent and the receiver
//! meet only through the library's formats (neither depends on the other, not even for its
//! tests); the demo and the tests, which run both, are the only crates that may.

use std::collections::BTreeMap;
use std::process::Command;

#[test]
fn crates_depend_on_each_other_only_one_way() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let ours: Vec<&str> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    // Each workspace crate: the workspace crates it depends on, any kind (normal, dev, build).
    let deps: BTreeMap<&str, Vec<&str>> = packages
        .iter()
        .map(|p| {
            let mut on: Vec<&str> = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["name"].as_str().unwrap())
                .filter(|n| ours.contains(n))
                .collect();
            on.sort();
            on.dedup();
            (p["name"].as_str().unwrap(), on)
        })
        .collect();
    eprintln!("{deps:#?}");
    let on = |krate: &str| {
        deps.get(krate)
            .unwrap_or_else(|| panic!("no crate {krate}"))
    };
    assert!(on("ctk").is_empty(), "ctk depends on {:?}", on("ctk"));
    assert!(
        on("ctk-nbd").is_empty(),
        "ctk-nbd depends on {:?}",
        on("ctk-nbd")
    );
    assert_eq!(on("ctk-net"), &["ctk"], "ctk-net");
    assert!(
        !on("ctk-agent").contains(&"ctk-receiver"),
        "the agent depends on the receiver"
    );
    assert!(
        !on("ctk-receiver").contains(&"ctk-agent"),
        "the receiver depends on the agent"
    );
    for daemon in ["ctk-agent", "ctk-receiver"] {
        for runner in ["ctk-demo", "ctk-tests", "ctk-sim", "ctk-benches"] {
            assert!(
                !on(daemon).contains(&runner),
                "{daemon} depends on {runner}"
            );
        }
    }
}
