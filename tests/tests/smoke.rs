use limiter_common::Action;
use limiter_tests::{frame::*, harness::*};
use std::net::Ipv4Addr;

#[test]
fn loads_and_denies() {
    let mut h = Harness::new();
    h.rule(RuleSpec::new(1, Action::Deny), &["198.18.0.0/15"]);
    let f = Frame::v4(Ipv4Addr::new(198, 18, 0, 7), L4::Udp).build();
    assert_eq!(h.xdp(&f).0, XDP_DROP);
    assert_eq!(h.tc(&f).action, TC_ACT_SHOT);
}
