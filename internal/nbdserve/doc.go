// Package nbdserve serves disks read-only over the Network Block Device
// protocol, so that the disks of a snapshot can be read in place by
// qemu-img, qemu, nbdinfo, nbdcopy or nbdfuse without restoring them first.
// Each Export is a ReaderAt plus the map of its ranges that hold data:
// reads answer holes with NBD_REPLY_TYPE_OFFSET_HOLE instead of zeros on the
// wire, and base:allocation block status tells clients where the data is,
// so a copy of a sparse disk stays sparse and fast.
//
// The server is written here rather than taken from a library: the Go NBD
// servers known (github.com/pojntfx/go-nbd among them) speak the fixed
// newstyle handshake and simple replies only, with no structured replies
// and no meta contexts, hence no base:allocation block status, which is
// what makes serving a sparse snapshot worth it. The wire constants are
// shared with the client of package nbd.
//
// Everything a client sends is bounded before it is believed: option
// lengths, names, request lengths against the export; a client that breaks
// the framing loses its connection, one that asks for something wrong gets
// an error reply and keeps it.
package nbdserve
