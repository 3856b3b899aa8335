package testsrv

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"
)

// Azurite's built-in account, documented by Microsoft for the emulator.
const (
	AzuriteAccount = "devstoreaccount1"
	AzuriteKey     = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

// Azurite is a running Azurite blob service.
type Azurite struct {
	*process
	Port int
	// URL is the account's blob endpoint, path-style:
	// http://127.0.0.1:PORT/devstoreaccount1
	URL string
}

// AzuriteBin returns the path of azurite-blob that .ci/services installs.
func AzuriteBin(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("SAUVE_AZURITE"); p != "" {
		return p
	}
	bin := filepath.Join(ModuleRoot(t), ".ci", "azurite", "node_modules", ".bin", "azurite-blob")
	if _, err := os.Stat(bin); err != nil {
		missing(t, "Azurite ("+bin+")")
	}
	return bin
}

// StartAzurite starts Azurite's blob service with its data in a temporary
// folder.
func StartAzurite(t testing.TB) *Azurite {
	t.Helper()
	bin := AzuriteBin(t)
	port := FreePort(t)
	dir := t.TempDir()
	p := start(t, "azurite", port, []string{bin,
		"--blobHost", "127.0.0.1", "--blobPort", strconv.Itoa(port), "--location", dir,
		"--disableTelemetry", "--skipApiVersionCheck", "--silent",
	}, nil)
	return &Azurite{process: p, Port: port, URL: fmt.Sprintf("http://127.0.0.1:%d/%s", port, AzuriteAccount)}
}

// ConnectionString returns a connection string for the emulator.
func (a *Azurite) ConnectionString() string {
	return fmt.Sprintf("DefaultEndpointsProtocol=http;AccountName=%s;AccountKey=%s;BlobEndpoint=%s;", AzuriteAccount, AzuriteKey, a.URL)
}

// CreateContainer makes a container with the account key.
func (a *Azurite) CreateContainer(t testing.TB, name string) {
	t.Helper()
	cred, err := container.NewSharedKeyCredential(AzuriteAccount, AzuriteKey)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := container.NewClientWithSharedKeyCredential(a.URL+"/"+name, cred, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cc.Create(context.Background(), nil); err != nil && !bloberror.HasCode(err, bloberror.ContainerAlreadyExists) {
		t.Fatalf("create container %s: %v", name, err)
	}
}

// SAS returns a container URL (with an optional prefix path) carrying a
// service SAS with the given permission letters (for example "racwdl"),
// valid from start until expiry, as the Azure portal would hand it out.
func (a *Azurite) SAS(t testing.TB, containerName, prefix, perms string, start, expiry time.Time) string {
	t.Helper()
	return ContainerSAS(t, a.URL, AzuriteAccount, AzuriteKey, containerName, prefix, perms, start, expiry)
}

// ContainerSAS signs a container SAS for account/key at endpoint.
func ContainerSAS(t testing.TB, endpoint, account, key, containerName, prefix, perms string, start, expiry time.Time) string {
	t.Helper()
	cred, err := container.NewSharedKeyCredential(account, key)
	if err != nil {
		t.Fatal(err)
	}
	var p sas.ContainerPermissions
	for _, c := range perms {
		switch c {
		case 'r':
			p.Read = true
		case 'a':
			p.Add = true
		case 'c':
			p.Create = true
		case 'w':
			p.Write = true
		case 'd':
			p.Delete = true
		case 'l':
			p.List = true
		default:
			t.Fatalf("SAS permission %q not handled", c)
		}
	}
	qp, err := sas.BlobSignatureValues{
		Protocol:      sas.ProtocolHTTPSandHTTP,
		StartTime:     start.UTC(),
		ExpiryTime:    expiry.UTC(),
		Permissions:   p.String(),
		ContainerName: containerName,
	}.SignWithSharedKey(cred)
	if err != nil {
		t.Fatal(err)
	}
	u := endpoint + "/" + containerName
	if prefix != "" {
		u += "/" + prefix
	}
	return u + "?" + qp.Encode()
}
