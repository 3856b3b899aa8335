package agent

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Bounds on an authorized-keys or known-agents file: the agent reads the
// former at every connection, so a huge file must fail, not stall it.
const (
	maxListFile = 1 << 20
	maxListLine = 8 << 10
)

// MaxWindow is the longest freeze any key may be granted: the thaw
// guard's own limit (shadow.GuardMain refuses a longer timeout).
const MaxWindow = time.Hour

// SerialFrom is the from= item that admits a key on the virtio-serial
// port, which has no network address: a key restricted to addresses is
// not accepted there unless its list names it.
const SerialFrom = "serial"

// AuthorizedKey is one line of an authorized-keys file: a caller's key
// and what it may do.
type AuthorizedKey struct {
	Key PublicKey
	// From, when not empty, are the only addresses the key is accepted
	// from; Serial admits it on the virtio-serial port as well. Both
	// empty: from anywhere.
	From   []netip.Prefix
	Serial bool
	// Window is the longest freeze this key may ask (0: the agent's
	// own limit).
	Window  time.Duration
	Comment string
	Line    int // in its file, for messages
}

// Restricted says whether the key has an address allow-list.
func (a *AuthorizedKey) Restricted() bool { return len(a.From) > 0 || a.Serial }

// Allows says whether a request from peer may use the key.
func (a *AuthorizedKey) Allows(p Peer) bool {
	if !a.Restricted() {
		return true
	}
	if p.Serial {
		return a.Serial
	}
	if !p.IP.IsValid() {
		return false
	}
	ip := p.IP.Unmap()
	for _, pr := range a.From {
		if pr.Contains(ip) {
			return true
		}
	}
	return false
}

// fromList is the key's from= value, as written.
func (a *AuthorizedKey) fromList() string {
	var items []string
	for _, p := range a.From {
		if p.IsSingleIP() {
			items = append(items, p.Addr().String())
		} else {
			items = append(items, p.String())
		}
	}
	if a.Serial {
		items = append(items, SerialFrom)
	}
	return strings.Join(items, ",")
}

// String is the key's line in an authorized-keys file.
func (a *AuthorizedKey) String() string {
	var opts []string
	if a.Restricted() {
		opts = append(opts, `from="`+a.fromList()+`"`)
	}
	if a.Window > 0 {
		opts = append(opts, "window="+a.Window.String())
	}
	s := a.Key.Line(a.Comment)
	if len(opts) > 0 {
		s = strings.Join(opts, ",") + " " + s
	}
	return s
}

// ParseFrom reads a from= list: IP addresses, CIDR prefixes and "serial",
// separated by commas.
func ParseFrom(list string) ([]netip.Prefix, bool, error) {
	var out []netip.Prefix
	serial := false
	for _, item := range strings.Split(list, ",") {
		item = strings.TrimSpace(item)
		switch {
		case item == "":
			return nil, false, fmt.Errorf("from=%.80q: an empty item", list)
		case item == SerialFrom:
			serial = true
		case strings.Contains(item, "/"):
			p, err := netip.ParsePrefix(item)
			if err != nil {
				return nil, false, fmt.Errorf("from=: %.60q is not a CIDR prefix such as 10.0.0.0/8", item)
			}
			if p.Addr().Zone() != "" {
				return nil, false, fmt.Errorf("from=: %.60q: zones are not supported", item)
			}
			if p.Addr().Is4In6() {
				// ::ffff:10.0.0.0/104 is 10.0.0.0/8: peers are compared
				// unmapped.
				if p.Bits() < 96 {
					return nil, false, fmt.Errorf("from=: %.60q mixes IPv4 and IPv6 addresses", item)
				}
				p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
			}
			out = append(out, p.Masked())
		default:
			ip, err := netip.ParseAddr(item)
			if err != nil || ip.Zone() != "" {
				// Host names are refused: an allow-list that trusts
				// whoever answers for a name in DNS is not one.
				return nil, false, fmt.Errorf("from=: %.60q is not an IP address, a CIDR prefix or %q (host names are not accepted)", item, SerialFrom)
			}
			ip = ip.Unmap()
			out = append(out, netip.PrefixFrom(ip, ip.BitLen()))
		}
	}
	return out, serial, nil
}

// ParseAuthorizedLine reads one line: "[OPTIONS] sauve-ed25519 BASE64
// [COMMENT]". OPTIONS are from="LIST" and window=DURATION, separated by
// commas; an unknown option is an error, since ignoring a restriction
// would grant more than its author meant. Blank lines and # comments
// give ok false.
func ParseAuthorizedLine(line string) (a AuthorizedKey, ok bool, err error) {
	line = strings.TrimSpace(line)
	if line == "" || line[0] == '#' {
		return a, false, nil
	}
	if len(line) > maxListLine {
		return a, false, fmt.Errorf("longer than %d bytes", maxListLine)
	}
	if first, _, _ := strings.Cut(line, " "); strings.HasPrefix(first, "ssh-") || strings.HasPrefix(first, "ecdsa-") || strings.HasPrefix(first, "sk-") {
		return a, false, fmt.Errorf("an OpenSSH key (%.40s): a public key starts with %q (make one with 'sauve agent keygen')", first, KeyType)
	}
	rest := line
	if !strings.HasPrefix(line, KeyType+" ") {
		opts, after, err := splitOptions(line)
		if err != nil {
			return a, false, err
		}
		if err := a.setOptions(opts); err != nil {
			return a, false, err
		}
		rest = after
	}
	k, comment, err := ParsePublicKey(rest)
	if err != nil {
		return a, false, err
	}
	a.Key, a.Comment = k, comment
	return a, true, nil
}

// splitOptions cuts the options field (up to the first space outside
// quotes) from the rest of the line and splits it at commas outside
// quotes.
func splitOptions(line string) ([]string, string, error) {
	var opts []string
	start, quoted := 0, false
	for i := 0; i < len(line); i++ {
		switch c := line[i]; {
		case c == '"':
			quoted = !quoted
		case quoted:
		case c == ',':
			opts = append(opts, line[start:i])
			start = i + 1
		case c == ' ' || c == '\t':
			opts = append(opts, line[start:i])
			return opts, strings.TrimLeft(line[i:], " \t"), nil
		}
	}
	if quoted {
		return nil, "", errors.New("an option's quotes are not closed")
	}
	return nil, "", fmt.Errorf("no public key (%s BASE64) after the options", KeyType)
}

// setOptions applies the options of a line.
func (a *AuthorizedKey) setOptions(opts []string) error {
	seen := map[string]bool{}
	for _, o := range opts {
		name, val, hasVal := strings.Cut(o, "=")
		if seen[name] {
			return fmt.Errorf("option %.40q is given twice", name)
		}
		seen[name] = true
		if hasVal {
			if unq, ok := unquote(val); ok {
				val = unq
			} else if strings.Contains(val, `"`) {
				return fmt.Errorf("option %.40q: stray quote in %.80q", name, val)
			}
		}
		switch name {
		case "from":
			if !hasVal {
				return errors.New(`option from wants a value: from="10.0.0.0/8,192.168.1.5"`)
			}
			from, serial, err := ParseFrom(val)
			if err != nil {
				return err
			}
			a.From, a.Serial = from, serial
		case "window":
			if !hasVal {
				return errors.New("option window wants a value: window=30s")
			}
			d, err := time.ParseDuration(val)
			if err != nil || d <= 0 || d > MaxWindow {
				return fmt.Errorf("window=%.40q: want a duration such as 30s, more than 0 and at most %s", val, MaxWindow)
			}
			a.Window = d
		default:
			return fmt.Errorf("unknown option %.40q (known: from=, window=)", name)
		}
	}
	return nil
}

func unquote(s string) (string, bool) {
	if len(s) >= 2 && s[0] == '"' && s[len(s)-1] == '"' && !strings.Contains(s[1:len(s)-1], `"`) {
		return s[1 : len(s)-1], true
	}
	return s, false
}

// AuthorizedKeys is a parsed authorized-keys file.
type AuthorizedKeys struct {
	Path string
	Keys []AuthorizedKey
}

// Lookup finds key.
func (ak *AuthorizedKeys) Lookup(key PublicKey) (*AuthorizedKey, bool) {
	for i := range ak.Keys {
		if ak.Keys[i].Key == key {
			return &ak.Keys[i], true
		}
	}
	return nil, false
}

// ParseAuthorized reads a whole file; name is used in errors. One bad line
// fails the whole file: an agent that skipped it could admit a key
// without the restrictions its line meant to put on it.
func ParseAuthorized(r io.Reader, name string) (*AuthorizedKeys, error) {
	ak := &AuthorizedKeys{Path: name}
	err := readLines(r, name, func(n int, line string) error {
		a, ok, err := ParseAuthorizedLine(line)
		if err != nil || !ok {
			return err
		}
		if prev, dup := ak.Lookup(a.Key); dup {
			return fmt.Errorf("key %s is listed already on line %d", a.Key.Fingerprint(), prev.Line)
		}
		a.Line = n
		ak.Keys = append(ak.Keys, a)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return ak, nil
}

// LoadAuthorized reads the authorized-keys file at path. A missing file
// is an empty list: nobody is authorized yet.
func LoadAuthorized(path string) (*AuthorizedKeys, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return &AuthorizedKeys{Path: path}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the authorized keys: %w", err)
	}
	defer f.Close()
	return ParseAuthorized(f, path)
}

// AppendAuthorized adds a to the file at path (created 0644 if missing,
// with its folder), refusing a key the file lists already.
func AppendAuthorized(path string, a AuthorizedKey) error {
	ak, err := LoadAuthorized(path)
	if err != nil {
		return err
	}
	if prev, dup := ak.Lookup(a.Key); dup {
		return fmt.Errorf("key %s is in %s already (line %d): edit that line to change its options", a.Key.Fingerprint(), path, prev.Line)
	}
	return appendLine(path, a.String())
}

// readLines calls fn with each line of r and its number, bounding the
// file and its lines; errors name file and line.
func readLines(r io.Reader, name string, fn func(n int, line string) error) error {
	br := bufio.NewReaderSize(io.LimitReader(r, maxListFile+1), 4096)
	total := 0
	for n := 1; ; n++ {
		line, err := readLine(br)
		total += len(line) + 1
		if total > maxListFile+1 {
			return fmt.Errorf("%s: larger than %d bytes", name, maxListFile)
		}
		if err == errLongLine {
			return fmt.Errorf("%s:%d: longer than %d bytes", name, n, maxListLine)
		}
		if err != nil && err != io.EOF {
			return fmt.Errorf("read %s: %w", name, err)
		}
		if ferr := fn(n, line); ferr != nil {
			return fmt.Errorf("%s:%d: %w", name, n, ferr)
		}
		if err == io.EOF {
			return nil
		}
	}
}

var errLongLine = errors.New("line too long")

// readLine reads up to a newline, at most maxListLine bytes.
func readLine(br *bufio.Reader) (string, error) {
	var buf bytes.Buffer
	for {
		chunk, err := br.ReadSlice('\n')
		buf.Write(chunk)
		if buf.Len() > maxListLine+1 {
			return "", errLongLine
		}
		if err == bufio.ErrBufferFull {
			continue
		}
		return strings.TrimSuffix(buf.String(), "\n"), err
	}
}

// appendLine appends line to the file at path, creating it (and its
// folder) if needed, with one write so that a concurrent reader sees
// the whole line or none of it.
func appendLine(path, line string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create the folder of %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	// A file whose last line has no newline gets one first, or the new
	// line would be glued to it.
	prefix := ""
	if fi, err := f.Stat(); err == nil && fi.Size() > 0 {
		last := make([]byte, 1)
		if rf, err := os.Open(path); err == nil {
			if _, err := rf.ReadAt(last, fi.Size()-1); err == nil && last[0] != '\n' {
				prefix = "\n"
			}
			rf.Close()
		}
	}
	if _, err := f.WriteString(prefix + line + "\n"); err != nil {
		f.Close()
		return fmt.Errorf("append to %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("append to %s: %w", path, err)
	}
	return nil
}
