//! `ctk-receiver serve --config FILE`: the receiver's settings in TOML (docs/config.md), each
//! also a flag. A flag given on the command line wins over the file; allowed agents from
//! both add up. A value that does not parse or validate is refused with the line it is on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;
use toml::Spanned;

use ctk_receiver::retention::Tier;
use ctk_receiver::{retention, store};

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    identity: Option<PathBuf>,
    store: Option<PathBuf>,
    listen: Option<Spanned<String>>,
    agents_file: Option<PathBuf>,
    #[serde(default)]
    agents: BTreeMap<String, Spanned<String>>,
    keep: Option<Spanned<usize>>,
    tiers: Option<Spanned<String>>,
    #[serde(default)]
    tiers_for: BTreeMap<String, Spanned<String>>,
}

/// The file's settings, validated.
#[derive(Debug, Default)]
pub struct ServeFile {
    pub identity: Option<PathBuf>,
    pub store: Option<PathBuf>,
    pub listen: Option<std::net::SocketAddr>,
    /// Relative to the file's directory when relative.
    pub agents_file: Option<PathBuf>,
    pub agents: Vec<(String, ctk_net::Fingerprint)>,
    pub keep: Option<usize>,
    pub tiers: Option<Vec<Tier>>,
    pub tiers_for: Vec<(String, Vec<Tier>)>,
}

/// Longest configuration file read (a few agents and tiers take a few KiB).
const CONFIG_LEN_MAX: u64 = 1 << 20;

/// Reads and validates `path`.
pub fn load(path: &Path) -> Result<ServeFile> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .take(CONFIG_LEN_MAX + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {} (it must be UTF-8 TOML)", path.display()))?;
    anyhow::ensure!(
        text.len() as u64 <= CONFIG_LEN_MAX,
        "{} is larger than 1 MiB: not a receiver's configuration",
        path.display()
    );
    parse(&text, path.parent().unwrap_or(Path::new(".")))
        .with_context(|| format!("in {}", path.display()))
}

/// The line (1-based) of byte `at` of `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

fn parse(text: &str, dir: &Path) -> Result<ServeFile> {
    let raw: Raw = toml::from_str(text).map_err(|e| anyhow!("{e}"))?;
    let at = |span: std::ops::Range<usize>, what: String| {
        anyhow!("line {}: {what}", line_of(text, span.start))
    };
    let listen = match raw.listen {
        Some(l) => Some(l.get_ref().parse().map_err(|e| {
            at(
                l.span(),
                format!(
                    "listen = {:?}: {e} (an address and UDP port, e.g. \"0.0.0.0:7420\")",
                    l.get_ref()
                ),
            )
        })?),
        None => None,
    };
    let mut agents = Vec::new();
    for (name, fp) in raw.agents {
        store::validate_agent_name(&name)
            .map_err(|e| at(fp.span(), format!("agent {name:?}: {e}")))?;
        let parsed = fp
            .get_ref()
            .parse()
            .map_err(|e| at(fp.span(), format!("agent {name:?}: {e}")))?;
        agents.push((name, parsed));
    }
    let tiers_of = |t: &Spanned<String>| {
        retention::parse_tiers(t.get_ref())
            .map_err(|e| at(t.span(), format!("tiers {:?}: {e}", t.get_ref())))
    };
    let tiers = raw.tiers.as_ref().map(tiers_of).transpose()?;
    let mut tiers_for = Vec::new();
    for (disk, t) in &raw.tiers_for {
        store::validate_name(disk).map_err(|e| at(t.span(), format!("tiers_for.{disk}: {e}")))?;
        tiers_for.push((disk.clone(), tiers_of(t)?));
    }
    let keep = match raw.keep {
        Some(k) if *k.get_ref() == 0 => {
            return Err(at(
                k.span(),
                "keep = 0: keep at least the newest point".into(),
            ));
        }
        k => k.map(|k| *k.get_ref()),
    };
    Ok(ServeFile {
        identity: raw.identity.map(|p| dir.join(p)),
        store: raw.store.map(|p| dir.join(p)),
        listen,
        agents_file: raw.agents_file.map(|p| dir.join(p)),
        agents,
        keep,
        tiers,
        tiers_for,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_complete_file_is_read_and_relative_paths_are_the_files() {
        let text = format!(
            "identity = \"id\"\nstore = \"/srv/ctk\"\nlisten = \"0.0.0.0:7420\"\nkeep = 12\n\
             tiers = \"1h:all,24h:1h\"\n[agents]\nhost1 = \"{FP}\"\n[tiers_for]\ndb1 = \"1h:all\"\n"
        );
        let f = parse(&text, Path::new("/etc/ctk")).unwrap();
        assert_eq!(f.identity, Some(PathBuf::from("/etc/ctk/id")));
        assert_eq!(f.store, Some(PathBuf::from("/srv/ctk")));
        assert_eq!(f.listen, Some("0.0.0.0:7420".parse().unwrap()));
        assert_eq!(f.keep, Some(12));
        assert_eq!(f.agents.len(), 1);
        assert_eq!(f.tiers.unwrap().len(), 2);
        assert_eq!(f.tiers_for[0].0, "db1");
    }

    #[test]
    fn a_file_past_the_limit_or_not_text_is_refused_before_it_is_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; CONFIG_LEN_MAX as usize + 1]).unwrap();
        let e = format!("{:#}", load(&big).unwrap_err());
        assert!(e.contains("larger than 1 MiB"), "{e}");
        let binary = dir.path().join("binary.toml");
        std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x80]).unwrap();
        let e = format!("{:#}", load(&binary).unwrap_err());
        assert!(e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_with_their_line() {
        for (text, line, what) in [
            ("keep = 3\nlisten = \"nowhere\"\n", "line 2", "listen"),
            ("[agents]\nok = \"sha256:zz\"\n", "line 2", "agent \"ok\""),
            (
                "\n\n[agents]\n\"../x\" = \"sha256:00\"\n",
                "line 4",
                "\"../x\"",
            ),
            ("tiers = \"1h:every\"\n", "line 1", "tiers"),
            ("keep = 0\n", "line 1", "keep"),
            ("[tiers_for]\n\"a/b\" = \"1h:all\"\n", "line 2", "tiers_for"),
        ] {
            let e = format!("{:#}", parse(text, Path::new(".")).unwrap_err());
            assert!(e.contains(line) && e.contains(what), "{text:?}: {e}");
        }
        // Unknown and mistyped fields, from the TOML reader, with their line too.
        for (text, line) in [
            ("\nlisten_on = \"x\"\n", "line 2"),
            ("keep = \"3\"\n", "line 1"),
        ] {
            let e = format!("{:#}", parse(text, Path::new(".")).unwrap_err());
            assert!(e.contains(line), "{text:?}: {e}");
        }
    }
}
