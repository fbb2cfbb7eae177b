//! Any bytes as what an NBD client sends the agent: the first byte picks the parser (a
//! transmission request header, a meta-context option payload, an INFO/GO payload), the
//! rest is its input. A typed refusal or a value; never a panic, never an allocation past
//! what the bytes themselves hold (libFuzzer's -rss_limit_mb catches those).
#![no_main]

use ctk_agent::nbd;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(header) = <&[u8; 28]>::try_from(rest) {
                let _ = nbd::parse_request(header);
            }
        }
        1 => {
            if let Ok(m) = nbd::parse_meta_request(rest) {
                // Every query came out of the bytes: it cannot hold more than they did.
                assert!(m.queries.iter().map(|q| q.len()).sum::<usize>() <= rest.len());
            }
        }
        _ => {
            if let Ok(i) = nbd::parse_info_request(rest) {
                assert!(i.name.len() + 2 * i.requests.len() <= rest.len());
            }
        }
    }
});
