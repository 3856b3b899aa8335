package shadow

// Until the NBD client is merged, the tests read exports with nbdcopy and
// nbdinfo, at once (the socket is gone once the views are made).

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"

	"github.com/sauve-backup/sauve/internal/extent"
)

type copiedExport struct {
	data []byte
	maps map[string][]struct {
		Offset, Length int64
		Type           uint32
	}
}

func testDial(ctx context.Context, network, address, export string, metas []string) (nbdExport, error) {
	if network != "unix" {
		return nil, fmt.Errorf("test reader: unix sockets only")
	}
	uri := fmt.Sprintf("nbd+unix:///%s?socket=%s", export, address)
	data, err := exec.CommandContext(ctx, "nbdcopy", uri, "-").Output()
	if err != nil {
		return nil, fmt.Errorf("nbdcopy %s: %w", uri, err)
	}
	e := &copiedExport{data: data, maps: map[string][]struct {
		Offset, Length int64
		Type           uint32
	}{}}
	for _, m := range metas {
		out, err := exec.CommandContext(ctx, "nbdinfo", "--json", "--map="+m, uri).Output()
		if err != nil {
			return nil, fmt.Errorf("nbdinfo --map=%s %s: %w", m, uri, err)
		}
		l := e.maps[m]
		if err := json.Unmarshal(out, &l); err != nil {
			return nil, fmt.Errorf("nbdinfo: %w", err)
		}
		e.maps[m] = l
	}
	return e, nil
}

func (e *copiedExport) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(e.data)) {
		return 0, fmt.Errorf("read past the end")
	}
	return copy(p, e.data[off:]), nil
}

func (e *copiedExport) Size() int64 { return int64(len(e.data)) }

func (e *copiedExport) Close() error { return nil }

type listMap []extent.Range

func (l listMap) Data(off, n int64) ([]extent.Range, error) {
	var out []extent.Range
	for _, r := range l {
		s, t := max(r.Start, off), min(r.End, off+n)
		if s < t {
			out = append(out, extent.Range{Start: s, End: t})
		}
	}
	return out, nil
}

func (e *copiedExport) Map(ctx context.Context, meta string, data func(uint32) bool) extent.Map {
	var l listMap
	for _, x := range e.maps[meta] {
		if data(x.Type) {
			l = append(l, extent.Range{Start: x.Offset, End: x.Offset + x.Length})
		}
	}
	return l
}
