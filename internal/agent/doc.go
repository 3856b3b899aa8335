// Package agent is sauve's quiescing agent and its client. The agent runs
// in a guest or on a database host; a backup connects to it, both sides
// authenticate with Ed25519 keys, the backup asks it to freeze, takes its
// point-in-time copy, and asks it to thaw. The agent always thaws: when
// asked, when the window ends, when the connection drops, and, through
// the thaw guard and its state file, when it dies.
//
// The wire protocol is this package's own (docs/AGENT.md). No maintained
// library does what it needs: gRPC or HTTP would bring TLS with CA
// verification and a large surface, but nothing for the virtio-serial
// port, which has no TLS; SSH is a login protocol whose authorized_keys
// semantics (commands, forwarding) do not fit; Noise or libsodium-style
// handshakes exist in Go only as small unmaintained packages. What is
// needed is small: a handshake that signs a transcript with both nonces,
// both keys, the time, the purpose and the TLS exporter, then a handful
// of signed messages. It is built on crypto/ed25519 and crypto/tls.
//
// Files: keys, authorized-keys and known-agents files (keys.go,
// authorized.go, known.go); framing and messages (wire.go, messages.go,
// transcript.go); transports (channel.go, tlsconf.go, serial.go); the
// agent (server.go, agent_handshake.go, agent_session.go, log.go) and
// what it freezes (freezer.go, chain.go, state.go, mounts.go); the caller
// (client.go, client_handshake.go, client_session.go).
package agent
