package s3

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/smithy-go"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/netx"
)

type op int

const (
	opRead op = iota
	opWrite
	opList
	opDelete
	opCreateBucket
)

// action is the IAM action a request needs.
func action(o op) string {
	switch o {
	case opWrite:
		return "s3:PutObject"
	case opList:
		return "s3:ListBucket"
	case opDelete:
		return "s3:DeleteObject"
	case opCreateBucket:
		return "s3:CreateBucket"
	}
	return "s3:GetObject"
}

func purpose(o op, h backend.Handle) string {
	switch o {
	case opList:
		return backend.ListPurpose(h.Type)
	case opWrite:
		return "to store " + h.String()
	case opDelete:
		return "to remove " + h.String()
	case opCreateBucket:
		return "to create the bucket"
	}
	return "to read " + h.String()
}

// code returns the S3 error code of err, or "".
func code(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode()
	}
	return ""
}

func status(err error) int {
	var re *awshttp.ResponseError
	if errors.As(err, &re) {
		return re.HTTPStatusCode()
	}
	return 0
}

func isPreconditionFailed(err error) bool {
	c := code(err)
	return c == "PreconditionFailed" || c == "ConditionalRequestConflict" || status(err) == http.StatusPreconditionFailed
}

func isNotImplemented(err error) bool {
	return code(err) == "NotImplemented" || status(err) == http.StatusNotImplemented
}

// transient says whether a retry may succeed: network errors, timeouts,
// throttling, server errors, and a body that arrived damaged or short.
func transient(err error) bool {
	st, c := status(err), code(err)
	switch c {
	case "SlowDown", "RequestTimeout", "InternalError", "IncompleteBody", "BadDigest", "XAmzContentSHA256Mismatch", "RequestTimeTooSkewed":
		return true
	}
	return st == 0 || st == http.StatusRequestTimeout || st == http.StatusTooManyRequests || st >= 500
}

// brief is a short message for a transient error (retry warnings): the
// SDK's own repeats the request URL and empty request IDs.
func brief(err error) error {
	if st := status(err); st != 0 {
		return fmt.Errorf("S3 answered %d %s", st, code(err))
	}
	return netx.Cause(err)
}

// classify explains err and marks it permanent when retrying cannot help.
func (b *Backend) classify(err error, what string, o op, h backend.Handle) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	c, st := code(err), status(err)
	desc := fmt.Sprintf("S3 answered %d %s", st, c)
	switch {
	case c == "NoSuchKey" || (st == http.StatusNotFound && (c == "NotFound" || c == "")):
		return fmt.Errorf("%s: %w", what, backend.ErrNotExist)
	case c == "NoSuchBucket":
		return fmt.Errorf("%s: bucket %q does not exist ('sauve init' creates it): %w", what, b.bucket, backend.ErrNotExist)
	case c == "ExpiredToken" || c == "TokenRefreshRequired":
		return fmt.Errorf("%s: the AWS session token has expired (%s): renew the credentials: %w", what, c, backend.ErrPermission)
	case c == "InvalidAccessKeyId":
		return fmt.Errorf("%s: %s does not know the access key (InvalidAccessKeyId): check AWS_ACCESS_KEY_ID and the endpoint: %w", what, b.location, backend.ErrPermission)
	case c == "SignatureDoesNotMatch":
		return fmt.Errorf("%s: the request signature does not match (SignatureDoesNotMatch): check AWS_SECRET_ACCESS_KEY and AWS_REGION (%s): %w", what, b.region, backend.ErrPermission)
	case c == "AccessDenied" || c == "AllAccessDisabled" || st == http.StatusForbidden:
		return fmt.Errorf("%s: access denied: the credentials need %s on %s, %s (%s): %w", what, action(o), b.location, purpose(o, h), desc, backend.ErrPermission)
	case c == "InvalidRange" || st == http.StatusRequestedRangeNotSatisfiable:
		return &backend.Permanent{Err: fmt.Errorf("%s: the range is past the end of the object (%s)", what, desc)}
	case c == "NoCredentialProviders" || isNoCredentials(err):
		return fmt.Errorf("%s: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE: %w", what, backend.ErrPermission)
	case st != 0 && transient(err):
		return fmt.Errorf("%s: %s", what, desc) // retried
	case st >= 400:
		return &backend.Permanent{Err: fmt.Errorf("%s in %s: %s", what, b.location, desc)}
	}
	return fmt.Errorf("%s in %s: %w", what, b.location, netx.Cause(err))
}

func isNoCredentials(err error) bool {
	var oe *smithy.OperationError
	if !errors.As(err, &oe) {
		return false
	}
	// The SDK reports a failed credential lookup as an operation error
	// without a response; its text is the only mark.
	return status(err) == 0 && containsAny(err.Error(), "failed to retrieve credentials", "no EC2 IMDS role found", "failed to refresh cached credentials")
}

func containsAny(s string, subs ...string) bool {
	for _, x := range subs {
		if strings.Contains(s, x) {
			return true
		}
	}
	return false
}
