package azure

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/netx"
)

// op is the kind of request, for explaining refusals.
type op int

const (
	opRead op = iota
	opWrite
	opList
	opDelete
	opCreateContainer
)

// sasInfo is what a SAS token says about itself (the signature excluded).
type sasInfo struct {
	perms         string // sp
	start, expiry time.Time
	resource      string // sr: c (container), b (blob); "" for an account SAS
	resourceTypes string // srt, account SAS: s, c, o
	services      string // ss, account SAS
}

func parseSAS(q url.Values) *sasInfo {
	s := &sasInfo{perms: q.Get("sp"), resource: q.Get("sr"), resourceTypes: q.Get("srt"), services: q.Get("ss")}
	s.start = parseSASTime(q.Get("st"))
	s.expiry = parseSASTime(q.Get("se"))
	return s
}

// parseSASTime reads the ISO 8601 forms SAS tokens use (with or without
// seconds and fractions); a form it does not know reads as zero.
func parseSASTime(v string) time.Time {
	for _, f := range []string{time.RFC3339Nano, "2006-01-02T15:04Z07:00", "2006-01-02T15:04:05", "2006-01-02"} {
		if t, err := time.Parse(f, v); err == nil {
			return t.UTC()
		}
	}
	return time.Time{}
}

// validity reports a token that has expired or is not valid yet.
func (s *sasInfo) validity(now time.Time) error {
	if !s.expiry.IsZero() && !now.Before(s.expiry) {
		return fmt.Errorf("the SAS token expired at %s (%s ago, se=%s): create a new one: %w",
			s.expiry.Format(time.RFC3339), ago(now.Sub(s.expiry)), s.expiry.Format("2006-01-02T15:04:05Z"), backend.ErrPermission)
	}
	if !s.start.IsZero() && now.Before(s.start) {
		return fmt.Errorf("the SAS token is not valid before %s (st=%s; is this machine's clock right?): %w",
			s.start.Format(time.RFC3339), s.start.Format("2006-01-02T15:04:05Z"), backend.ErrPermission)
	}
	return nil
}

func ago(d time.Duration) string {
	switch {
	case d >= 48*time.Hour:
		return fmt.Sprintf("%d days", int(d/(24*time.Hour)))
	case d >= 2*time.Hour:
		return fmt.Sprintf("%d hours", int(d/time.Hour))
	case d >= 2*time.Minute:
		return fmt.Sprintf("%d minutes", int(d/time.Minute))
	}
	return d.Round(time.Second).String()
}

// purpose says, for a refusal, what the request was needed for.
func purpose(o op, h backend.Handle) string {
	switch o {
	case opList:
		return backend.ListPurpose(h.Type)
	case opWrite:
		return "to store " + h.String()
	case opDelete:
		return "to remove " + h.String()
	}
	return "to read " + h.String()
}

// Advice for the permissions a SAS needs (docs/PERMISSIONS.md has the
// table per command).
const sasAdvice = "a SAS for backups needs sp=rwl (or rcl: create-only, on Azure), one for every command sp=rwdl"

// lacks names the permission letter a SAS is missing for o, or "".
func (s *sasInfo) lacks(o op) string {
	has := func(c string) bool { return strings.Contains(s.perms, c) }
	switch o {
	case opRead:
		if !has("r") {
			return "read (r)"
		}
	case opList:
		if !has("l") {
			return "list (l)"
		}
	case opWrite:
		if !has("w") && !has("c") {
			return "write (w)"
		}
	case opDelete:
		if !has("d") {
			return "delete (d)"
		}
	}
	return ""
}

// transient says whether a retry may succeed: network errors, timeouts,
// throttling, server errors, and a body that arrived damaged.
func transient(err error) bool {
	var re *azcore.ResponseError
	if !errors.As(err, &re) {
		return true
	}
	switch bloberror.Code(re.ErrorCode) {
	case bloberror.MD5Mismatch, bloberror.CRC64Mismatch, bloberror.OperationTimedOut, bloberror.ServerBusy, bloberror.InternalError:
		return true
	}
	return re.StatusCode == http.StatusRequestTimeout || re.StatusCode == http.StatusTooManyRequests || re.StatusCode >= 500
}

// brief is a short message for a transient error (retry warnings): the
// SDK's own holds the whole response.
func brief(err error) error {
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		return fmt.Errorf("the service answered %d %s", re.StatusCode, re.ErrorCode)
	}
	return scrubbed{netx.Cause(err)}
}

// classify turns an SDK error into one that says what happened without
// secrets, marks it permanent when retrying cannot help, and wraps the
// backend's sentinel errors.
func (b *Backend) classify(err error, what string, o op, h backend.Handle) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	var re *azcore.ResponseError
	if !errors.As(err, &re) {
		var p *backend.Permanent
		if errors.As(err, &p) {
			return err // from retries that gave up, explained already
		}
		// Network trouble: transient. Messages of net/http errors hold
		// the request URL, SAS included.
		return fmt.Errorf("%s in %s: %w", what, b.location, scrubbed{netx.Cause(err)})
	}
	code := bloberror.Code(re.ErrorCode)
	status := re.StatusCode
	desc := fmt.Sprintf("Azure answered %d %s", status, code)
	if code == "" {
		desc = fmt.Sprintf("Azure answered %d %s", status, http.StatusText(status))
	}
	switch {
	case code == bloberror.BlobNotFound || (status == http.StatusNotFound && code == ""):
		return fmt.Errorf("%s: %w", what, backend.ErrNotExist)
	case code == bloberror.ContainerNotFound:
		hint := "create it, or give the URL of an existing container"
		if b.canCreate {
			hint = "'sauve init' creates it"
		}
		return fmt.Errorf("%s: container %q does not exist (%s): %w", what, b.container, hint, backend.ErrNotExist)
	case status == http.StatusForbidden || status == http.StatusUnauthorized:
		return b.refused(what, o, h, code, desc)
	case status == http.StatusRequestedRangeNotSatisfiable:
		return &backend.Permanent{Err: fmt.Errorf("%s: the range is past the end of the object (%s)", what, desc)}
	case transient(err):
		return fmt.Errorf("%s: %s", what, desc) // retried
	}
	return &backend.Permanent{Err: fmt.Errorf("%s in %s: %s", what, b.location, desc)}
}

// refused explains a 403.
func (b *Backend) refused(what string, o op, h backend.Handle, code bloberror.Code, desc string) error {
	if b.sas == nil {
		return fmt.Errorf("%s: %s: the account key or connection string is not accepted for %s: %w", what, desc, b.location, backend.ErrPermission)
	}
	if err := b.sas.validity(time.Now()); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if l := b.sas.lacks(o); l != "" {
		return fmt.Errorf("the SAS token (sp=%s) lacks %s permission, needed %s; %s: %w", b.sas.perms, l, purpose(o, h), sasAdvice, backend.ErrPermission)
	}
	switch code {
	case bloberror.AuthorizationPermissionMismatch:
		if o == opWrite && !strings.Contains(b.sas.perms, "w") {
			return fmt.Errorf("the SAS token (sp=%s) has create (c) but not write (w) permission, and this server wants w %s (older Azure API versions and Azurite do); %s: %w",
				b.sas.perms, purpose(o, h), sasAdvice, backend.ErrPermission)
		}
	case bloberror.AuthorizationResourceTypeMismatch:
		return fmt.Errorf("%s: the account SAS token (srt=%s) must allow containers and objects (srt=co): %w", what, b.sas.resourceTypes, backend.ErrPermission)
	case bloberror.AuthorizationServiceMismatch:
		return fmt.Errorf("%s: the account SAS token (ss=%s) must allow the blob service (ss=b): %w", what, b.sas.services, backend.ErrPermission)
	case bloberror.AuthorizationSourceIPMismatch:
		return fmt.Errorf("%s: the SAS token does not allow this machine's IP address (sip): %w", what, backend.ErrPermission)
	case bloberror.AuthorizationProtocolMismatch:
		return fmt.Errorf("%s: the SAS token allows HTTPS only (spr=https) but the URL is http: %w", what, backend.ErrPermission)
	case bloberror.AuthenticationFailed, bloberror.AuthorizationFailure:
		return fmt.Errorf("%s: Azure does not accept the SAS token (%s): its signature does not match (was the URL cut short when pasted, or the account key rotated?), or a stored access policy revoked it: %w", what, desc, backend.ErrPermission)
	}
	return fmt.Errorf("%s: %s: the SAS token (sp=%s) is refused: %w", what, desc, b.sas.perms, backend.ErrPermission)
}

var sigRE = regexp.MustCompile(`(?i)(sig=)[^&\s"']*`)

// scrubSecrets removes SAS signatures from a message.
func scrubSecrets(s string) string { return sigRE.ReplaceAllString(s, "${1}REDACTED") }

// scrubbed is an error whose message has its SAS signatures removed.
type scrubbed struct{ err error }

func (s scrubbed) Error() string { return scrubSecrets(s.err.Error()) }
func (s scrubbed) Unwrap() error { return s.err }

// Limits implements the limits a SAS token states (backend.LimitsOf).
func (b *Backend) Limits() backend.Limits {
	if b.sas == nil {
		return backend.Limits{}
	}
	return backend.Limits{NoList: b.sas.lacks(opList) != "", Expires: b.sas.expiry, Credential: "the SAS token (sp=" + b.sas.perms + ")"}
}
