//! Any bytes as a wire frame (agent <-> receiver): a typed error or a message that encodes back
//! to the same message; never a panic, and never an allocation past the frame limit
//! (libFuzzer's -rss_limit_mb catches those).
#![no_main]

use ctk::wire::{Lane, PushEnd, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::decode(data) {
        assert_eq!(Request::decode(&r.encode()).expect("re-decodes"), r);
    }
    if let Ok(r) = Response::decode(data) {
        assert_eq!(Response::decode(&r.encode()).expect("re-decodes"), r);
    }
    if let Ok(e) = PushEnd::decode(data) {
        assert_eq!(PushEnd::decode(&e.encode()).expect("re-decodes"), e);
    }
    if let Ok(l) = Lane::decode(data) {
        assert_eq!(Lane::decode(&l.encode()).expect("re-decodes"), l);
    }
});
