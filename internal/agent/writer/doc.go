// Package writer holds the application writers: the pieces that, like
// Windows' VSS writers, flush one application and hold it still for the
// short window around a point-in-time copy (fsfreeze, an LVM or btrfs
// snapshot, a reflink copy, QEMU fleecing), so that the copy holds what the
// application would have written had it been stopped cleanly rather than
// what was on disk when the power went out.
//
// A point-in-time copy alone is crash-consistent. Databases recover from
// that, but recovery replays everything written since their last
// checkpoint, and applications that cache writes lose them. A writer
// closes that gap for one application: Freeze flushes and holds it, the
// caller takes the copy, Thaw lets it go. The window must stay short (the
// issue's target is under 2 s): writers hold applications, not disks, and
// the point-in-time copy itself is someone else's (internal/shadow).
//
// A Set freezes several writers in order under a deadline each, and
// decides what a writer that cannot freeze does to the snapshot: Abort
// (the default: no snapshot, and the error names the writer and what it
// said) or Degrade (the snapshot is taken anyway and recorded as
// crash-consistent, with why). Its Held thaws them in reverse order, each
// one even if another fails, and also after the backup's context was
// cancelled (Ctrl-C), because an application left frozen is worse than a
// failed backup.
//
// The writers, and why each is built the way it is:
//
//   - Hooks runs the user's --pre-freeze commands before the copy and the
//     --post-thaw commands after it. The post-thaw commands undo what the
//     pre-freeze commands did (restart a service, unpause a container), so
//     they run once any pre-freeze command has started, whatever happened
//     to it or to the backup, and all of them run even when one fails.
//     Each command runs in a process group of its own, so that a timeout
//     kills whatever it started too, and so that the Ctrl-C a user types
//     at sauve does not also kill a post-thaw command half-way through.
//
//   - PostgreSQL runs CHECKPOINT and holds nothing. PostgreSQL recovers
//     from an atomic point-in-time copy as from a crash; a checkpoint just
//     before the copy makes that recovery short, since only the WAL
//     written during the window is replayed. The non-exclusive backup
//     mode (pg_backup_start) would give a "real" backup, but it needs the
//     backup_label written back at restore and the WAL kept alongside the
//     copy; a block-level backup gets the same safety from the atomic copy.
//
//   - MySQL (also MariaDB) takes FLUSH TABLES WITH READ LOCK on a
//     connection of its own and keeps it until Thaw. The lock belongs to
//     that connection: when the connection dies (sauve killed with
//     kill -9, the machine's network gone, the server's wait_timeout
//     passed) the server drops the lock, so a dead sauve never leaves the
//     database read-only. The statement waits at most the freeze deadline
//     for the lock (lock_wait_timeout, and a KILL of the statement from a
//     second connection should the deadline pass first), because while it
//     waits it already blocks every other session's writes.
//
// Writers are reusable: Thaw leaves a writer ready for its next Freeze,
// which is what a long-running agent needs. A writer's Thaw may be called
// from another goroutine than its Freeze (a signal handler), but not while
// its Freeze runs: the Set never does that.
package writer
