//! End-to-end tests live in `end_to_end/`; this library is empty on purpose (the package exists
//! to hold that test binary).
