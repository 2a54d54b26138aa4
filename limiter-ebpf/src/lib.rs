#![no_std]
// The library target only exists so that cargo can track this crate as a
// build dependency of limiter-agent; the programs are in the `limiter` binary.
