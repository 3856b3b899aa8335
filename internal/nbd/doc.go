// Package nbd speaks the Network Block Device protocol. Its Client reads a
// QEMU VM's disks through the exports that qemu (its NBD server, or
// qemu-nbd, or qemu-storage-daemon) serves for fleecing backups: data with
// NBD_CMD_READ, and allocation and dirty bitmaps with NBD_CMD_BLOCK_STATUS
// over negotiated meta contexts. proto.go holds the protocol's constants,
// exported because the server of package nbdserve speaks the same wire, and
// the parsers of untrusted bytes the client uses.
//
// The client is written here rather than taken from a library: libnbd's Go
// bindings need cgo and libnbd on the host, which a static sauve binary must
// not require, and the pure-Go NBD packages found (github.com/pojntfx/go-nbd,
// github.com/Merovius/nbd) only perform the handshake and hand the socket to
// the kernel's /dev/nbd driver: they have no userspace transmission phase,
// no structured replies and no block status, and they allocate by lengths
// read off the wire without a bound.
//
// Everything read from the server is bounded before it is believed: option
// replies, chunk lengths against the request they answer, the number of
// fragments of a read, the number of meta contexts. A server that breaks the
// protocol fails the whole connection (every pending request gets the
// error, wrapping ErrProtocol), since nothing after a broken frame can be
// framed again.
package nbd
