//! libvirt-compatible audit records: formatting, the kernel audit subsystem sink, the journal.
