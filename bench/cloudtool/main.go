// Command cloudtool is bench/cloud.sh's helper: it runs a counting TCP
// proxy in front of a storage server (the bytes on the wire are what an
// incremental backup to the cloud costs), creates an Azure container and
// signs a SAS URL for it, and creates an S3 bucket.
//
//	cloudtool proxy -target 127.0.0.1:10000 -stats /tmp/az.stats   (prints its address)
//	cloudtool sas -endpoint http://127.0.0.1:10000/devstoreaccount1 -account A -key K -container C
//	cloudtool mkbucket -endpoint http://127.0.0.1:7070 -access A -secret S -bucket B
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"
	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/sauve-backup/sauve/internal/backend/faultproxy"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: cloudtool proxy|sas|mkbucket [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "proxy":
		err = proxy(os.Args[2:])
	case "sas":
		err = makeSAS(os.Args[2:])
	case "mkbucket":
		err = mkbucket(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "cloudtool:", err)
		os.Exit(1)
	}
}

// proxy forwards to -target and rewrites -stats (JSON counters) every
// 100 ms until SIGTERM.
func proxy(args []string) error {
	fs := flag.NewFlagSet("proxy", flag.ExitOnError)
	target := fs.String("target", "", "server address host:port")
	stats := fs.String("stats", "", "file to keep the byte counters in")
	fs.Parse(args)
	p, err := faultproxy.Start(*target, faultproxy.Faults{})
	if err != nil {
		return err
	}
	fmt.Println(p.Addr)
	write := func() {
		b, _ := json.Marshal(p.Stats())
		tmp := *stats + ".tmp"
		if os.WriteFile(tmp, b, 0o644) == nil {
			os.Rename(tmp, *stats)
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	t := time.NewTicker(100 * time.Millisecond)
	for {
		select {
		case <-t.C:
			write()
		case <-sig:
			write()
			return p.Close()
		}
	}
}

func makeSAS(args []string) error {
	fs := flag.NewFlagSet("sas", flag.ExitOnError)
	endpoint := fs.String("endpoint", "", "account blob endpoint")
	account := fs.String("account", "", "account name")
	key := fs.String("key", "", "account key")
	name := fs.String("container", "", "container (created if missing)")
	perms := fs.String("perms", "racwdl", "SAS permissions")
	fs.Parse(args)
	cred, err := container.NewSharedKeyCredential(*account, *key)
	if err != nil {
		return err
	}
	cc, err := container.NewClientWithSharedKeyCredential(*endpoint+"/"+*name, cred, nil)
	if err != nil {
		return err
	}
	if _, err := cc.Create(context.Background(), nil); err != nil && !bloberror.HasCode(err, bloberror.ContainerAlreadyExists) {
		return err
	}
	qp, err := sas.BlobSignatureValues{
		Protocol: sas.ProtocolHTTPSandHTTP, StartTime: time.Now().Add(-time.Hour).UTC(), ExpiryTime: time.Now().Add(48 * time.Hour).UTC(),
		Permissions: *perms, ContainerName: *name,
	}.SignWithSharedKey(cred)
	if err != nil {
		return err
	}
	fmt.Println(*endpoint + "/" + *name + "?" + qp.Encode())
	return nil
}

func mkbucket(args []string) error {
	fs := flag.NewFlagSet("mkbucket", flag.ExitOnError)
	endpoint := fs.String("endpoint", "", "S3 endpoint URL")
	access := fs.String("access", "", "access key")
	secret := fs.String("secret", "", "secret key")
	bucket := fs.String("bucket", "", "bucket")
	fs.Parse(args)
	c := s3.New(s3.Options{
		BaseEndpoint: aws.String(*endpoint), Region: "us-east-1", UsePathStyle: true,
		Credentials: credentials.NewStaticCredentialsProvider(*access, *secret, ""),
	})
	_, err := c.CreateBucket(context.Background(), &s3.CreateBucketInput{Bucket: bucket})
	return err
}
