package testsrv

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// VersityVersion is the versitygw release .ci/services installs.
const VersityVersion = "v1.8.0"

// S3Server is a running versitygw with the posix backend.
type S3Server struct {
	*process
	Endpoint  string // http://127.0.0.1:PORT
	Admin     string // admin API endpoint
	AccessKey string
	SecretKey string
	Region    string
	Dir       string // the folder it serves
}

// VersityBin finds the versitygw binary: $SAUVE_VERSITYGW, $PATH, or
// $(go env GOPATH)/bin where 'go install' puts it.
func VersityBin(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("SAUVE_VERSITYGW"); p != "" {
		return p
	}
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p
	}
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
			gopath = string(bytesTrim(out))
		}
	}
	for _, gp := range filepath.SplitList(gopath) {
		p := filepath.Join(gp, "bin", "versitygw")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	missing(t, "versitygw "+VersityVersion)
	return ""
}

func bytesTrim(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}

// StartVersity starts versitygw serving a temporary folder, with its
// internal IAM so that tests can add users with fewer rights.
func StartVersity(t testing.TB) *S3Server {
	t.Helper()
	bin := VersityBin(t)
	port, admin := FreePort(t), FreePort(t)
	dir := t.TempDir()
	data, iam := filepath.Join(dir, "data"), filepath.Join(dir, "iam")
	for _, d := range []string{data, iam} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	s := &S3Server{
		Endpoint: fmt.Sprintf("http://127.0.0.1:%d", port), Admin: fmt.Sprintf("http://127.0.0.1:%d", admin),
		AccessKey: "sauveadmin", SecretKey: "sauve-test-secret-0123456789", Region: "us-east-1", Dir: data,
	}
	s.process = start(t, "versitygw", port, []string{bin,
		"--access", s.AccessKey, "--secret", s.SecretKey, "--region", s.Region,
		"--port", "127.0.0.1:" + strconv.Itoa(port), "--admin-port", "127.0.0.1:" + strconv.Itoa(admin),
		"--iam-dir", iam, "--keep-alive", "--quiet",
		"posix", data,
	}, nil)
	waitPort(t, admin)
	return s
}

func waitPort(t testing.TB, port int) {
	t.Helper()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for i := 0; i < 600; i++ {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("versitygw admin API does not listen on %s", addr)
}

// Client returns an S3 client with the given keys.
func (s *S3Server) Client(access, secret string) *s3.Client {
	return s3.New(s3.Options{
		BaseEndpoint: aws.String(s.Endpoint), Region: s.Region, UsePathStyle: true,
		Credentials: credentials.NewStaticCredentialsProvider(access, secret, ""),
	})
}

// CreateBucket makes a bucket owned by the root user.
func (s *S3Server) CreateBucket(t testing.TB, name string) {
	t.Helper()
	if _, err := s.Client(s.AccessKey, s.SecretKey).CreateBucket(context.Background(), &s3.CreateBucketInput{Bucket: &name}); err != nil {
		t.Fatalf("create bucket %s: %v", name, err)
	}
}

// CreateUser adds a user with the role "user" (no rights of its own).
func (s *S3Server) CreateUser(t testing.TB, access, secret string) {
	t.Helper()
	out, err := exec.Command(VersityBin(t), "admin", "--access", s.AccessKey, "--secret", s.SecretKey,
		"--endpoint-url", s.Admin, "create-user", "--access", access, "--secret", secret, "--role", "user").CombinedOutput()
	if err != nil {
		t.Fatalf("versitygw admin create-user: %v\n%s", err, out)
	}
}

// SetPolicy sets a bucket policy (JSON).
func (s *S3Server) SetPolicy(t testing.TB, bucket, policy string) {
	t.Helper()
	_, err := s.Client(s.AccessKey, s.SecretKey).PutBucketPolicy(context.Background(), &s3.PutBucketPolicyInput{Bucket: &bucket, Policy: &policy})
	if err != nil {
		t.Fatalf("put bucket policy on %s: %v", bucket, err)
	}
}
