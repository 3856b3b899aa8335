package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"
)

// Version is the QEMU version a monitor announces in its greeting.
type Version struct {
	Major, Minor, Micro int
	// Package is the distribution's build ("Debian 1:7.2+dfsg-7"), often
	// empty.
	Package string
}

// String returns the version as QEMU prints it: "7.2.0".
func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro) }

// AtLeast reports whether v is major.minor or newer.
func (v Version) AtLeast(major, minor int) bool {
	return v.Major > major || v.Major == major && v.Minor >= minor
}

// Error is an error reply of the monitor: QEMU refused or failed a
// command.
type Error struct {
	// Command is the command that failed.
	Command string
	// Class is QEMU's error class: "GenericError", "CommandNotFound",
	// "DeviceNotFound", ...
	Class string
	// Desc is QEMU's description of the error, meant for humans.
	Desc string
}

func (e *Error) Error() string { return e.Command + ": " + e.Desc }

// Event is an asynchronous message of the monitor.
type Event struct {
	// Name is the event's name: "JOB_STATUS_CHANGE", "BLOCK_JOB_ERROR".
	Name string
	// Data is the event's "data" member, nil when it has none.
	Data json.RawMessage
	// Time is when QEMU emitted it.
	Time time.Time
}

// kind is what a line from the monitor is.
type kind int

const (
	kindGreeting kind = iota + 1
	kindReply
	kindEvent
)

// message is one line from the monitor, parsed.
type message struct {
	kind    kind
	version Version
	id      uint64 // replies
	hasID   bool
	ret     json.RawMessage // replies: the "return" member
	err     *Error          // replies: the "error" member
	event   Event
}

// wire is the union of the members of the monitor's messages.
type wire struct {
	QMP *struct {
		Version *struct {
			QEMU *struct {
				Major int `json:"major"`
				Minor int `json:"minor"`
				Micro int `json:"micro"`
			} `json:"qemu"`
			Package string `json:"package"`
		} `json:"version"`
	} `json:"QMP"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
	ID json.RawMessage `json:"id"`
}

var errNotQMP = errors.New("not a QMP message")

// parseMessage parses one line the monitor sent.
func parseMessage(line []byte) (message, error) {
	var w wire
	if err := json.Unmarshal(line, &w); err != nil {
		return message{}, fmt.Errorf("%w: %v", errNotQMP, err)
	}
	switch {
	case w.QMP != nil:
		v := w.QMP.Version
		if v == nil || v.QEMU == nil {
			return message{}, fmt.Errorf("%w: greeting without a QEMU version", errNotQMP)
		}
		return message{kind: kindGreeting, version: Version{v.QEMU.Major, v.QEMU.Minor, v.QEMU.Micro, v.Package}}, nil
	case w.Return != nil || w.Error != nil:
		m := message{kind: kindReply, ret: w.Return}
		if w.Error != nil {
			m.err = &Error{Class: w.Error.Class, Desc: w.Error.Desc}
		}
		if len(w.ID) > 0 {
			id, err := strconv.ParseUint(string(bytes.TrimSpace(w.ID)), 10, 64)
			if err != nil {
				return message{}, fmt.Errorf("%w: reply id %.40s is not ours", errNotQMP, w.ID)
			}
			m.id, m.hasID = id, true
		}
		return m, nil
	case w.Event != "":
		e := Event{Name: w.Event, Data: w.Data}
		if t := w.Timestamp; t != nil && t.Seconds >= 0 && t.Microseconds >= 0 && t.Microseconds < 1e6 {
			e.Time = time.Unix(t.Seconds, t.Microseconds*1000)
		}
		return message{kind: kindEvent, event: e}, nil
	}
	return message{}, fmt.Errorf("%w: neither a greeting, a reply nor an event", errNotQMP)
}
