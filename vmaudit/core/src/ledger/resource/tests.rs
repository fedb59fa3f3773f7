//! The resource rules on a stand-in kernel.
