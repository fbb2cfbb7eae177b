//! Consistency groups: disks of one application (a VM's OS, database and log disks) that are
//! always cut at one instant (`pipeline::cut_group`), so that they restore together. Named
//! in the configuration (`[[group]] name = "erp", disks = ["erp-os", "erp-db"]`) or with
//! `serve --group erp=erp-os,erp-db`; checked against the disks when the agent starts.

/// A group: its name and its members, as indexes into the agent's disks in ascending order
/// (the order every group cut takes their gates in).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub members: Vec<usize>,
}

/// Why a group cannot be.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    /// The name is not one the agent accepts for disks and groups.
    #[error("group name {0:?}: use 1 to 128 of A-Z a-z 0-9 . _ -, not starting with . or -")]
    BadName(String),
    /// No member.
    #[error("group {0:?} has no disks: name them, e.g. disks = [\"os\", \"db\"]")]
    Empty(String),
    /// A member the agent does not protect.
    #[error(
        "group {group:?} names disk {disk:?}, which this agent does not protect (it protects {known})"
    )]
    UnknownDisk {
        group: String,
        disk: String,
        known: String,
    },
    /// One disk twice in a group.
    #[error("group {group:?} names disk {disk:?} twice")]
    Repeated { group: String, disk: String },
    /// One disk in two groups: its cuts would belong to two instants.
    #[error(
        "disk {disk:?} is in groups {first:?} and {second:?}: a disk belongs to one group at most"
    )]
    InTwoGroups {
        disk: String,
        first: String,
        second: String,
    },
    /// Two groups of one name.
    #[error("group {0:?} is given twice")]
    Duplicate(String),
    /// More members than a group point may name on the wire.
    #[error("group {0:?} has more than {max} disks (split it)", max = ctk::wire::GROUP_MEMBERS_MAX)]
    TooLarge(String),
}

/// Whether `name` is a valid disk or group name: 1 to 128 of A-Z a-z 0-9 . _ -, not
/// starting with . or - (it becomes a file name on the receiver).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Parses `serve --group NAME=DISK,DISK,...`.
pub fn parse_flag(text: &str) -> Result<(String, Vec<String>), String> {
    let (name, disks) = text
        .split_once('=')
        .ok_or("use NAME=DISK,DISK,..., e.g. erp=erp-os,erp-db")?;
    let disks = disks
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect();
    Ok((name.to_owned(), disks))
}

/// Checks the groups `wanted` (name, member names) against the agent's `disks` (names in
/// the agent's order) and resolves them.
pub fn resolve(
    wanted: Vec<(String, Vec<String>)>,
    disks: &[&str],
) -> Result<Vec<Group>, GroupError> {
    let mut groups: Vec<Group> = Vec::with_capacity(wanted.len());
    for (name, members) in wanted {
        if !valid_name(&name) {
            return Err(GroupError::BadName(name));
        }
        if groups.iter().any(|g| g.name == name) {
            return Err(GroupError::Duplicate(name));
        }
        if members.is_empty() {
            return Err(GroupError::Empty(name));
        }
        if members.len() > ctk::wire::GROUP_MEMBERS_MAX {
            return Err(GroupError::TooLarge(name));
        }
        let mut indexes = Vec::with_capacity(members.len());
        for disk in members {
            let Some(i) = disks.iter().position(|d| *d == disk) else {
                return Err(GroupError::UnknownDisk {
                    group: name,
                    disk,
                    known: disks.join(", "),
                });
            };
            if indexes.contains(&i) {
                return Err(GroupError::Repeated { group: name, disk });
            }
            if let Some(other) = groups.iter().find(|g| g.members.contains(&i)) {
                return Err(GroupError::InTwoGroups {
                    disk,
                    first: other.name.clone(),
                    second: name,
                });
            }
            indexes.push(i);
        }
        indexes.sort_unstable();
        groups.push(Group {
            name,
            members: indexes,
        });
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(groups: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        groups
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|d| d.to_string()).collect()))
            .collect()
    }

    #[test]
    fn groups_resolve_in_disk_order_and_every_bad_group_is_refused_by_name() {
        let disks = ["os", "db", "wal", "other"];
        let ok = resolve(
            want(&[("erp", &["wal", "os", "db"]), ("x", &["other"])]),
            &disks,
        );
        assert_eq!(
            ok.unwrap(),
            vec![
                Group {
                    name: "erp".into(),
                    members: vec![0, 1, 2]
                },
                Group {
                    name: "x".into(),
                    members: vec![3]
                }
            ]
        );
        let err = |g: &[(&str, &[&str])]| resolve(want(g), &disks).unwrap_err();
        assert_eq!(err(&[("erp", &[])]), GroupError::Empty("erp".into()));
        assert!(matches!(err(&[("erp", &["os", "nope"])]),
            GroupError::UnknownDisk { disk, known, .. } if disk == "nope" && known.contains("wal")));
        assert!(matches!(
            err(&[("a", &["os", "db"]), ("b", &["db"])]),
            GroupError::InTwoGroups { disk, first, second } if disk == "db" && first == "a" && second == "b"
        ));
        assert!(matches!(
            err(&[("a", &["os", "os"])]),
            GroupError::Repeated { .. }
        ));
        assert_eq!(
            err(&[("a", &["os"]), ("a", &["db"])]),
            GroupError::Duplicate("a".into())
        );
        assert_eq!(
            err(&[("../a", &["os"])]),
            GroupError::BadName("../a".into())
        );
        assert!(err(&[("", &["os"])]).to_string().contains("group name"));
        let many: Vec<String> = (0..=ctk::wire::GROUP_MEMBERS_MAX)
            .map(|i| format!("d{i}"))
            .collect();
        let names: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            resolve(vec![("big".into(), many.clone())], &names),
            Err(GroupError::TooLarge("big".into()))
        );
        assert_eq!(
            parse_flag("erp=os, db,,wal"),
            Ok(("erp".into(), vec!["os".into(), "db".into(), "wal".into()]))
        );
        assert!(parse_flag("erp").is_err());
    }
}
