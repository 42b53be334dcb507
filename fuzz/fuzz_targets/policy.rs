//! Any bytes as a policy file, through every stage a policy goes through
//! (`loopguard::exercise`). Nothing may panic or overflow the stack, and
//! libFuzzer's -timeout and -rss_limit_mb catch runaway time and memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        loopguard::exercise::policy_text(text);
    }
});
