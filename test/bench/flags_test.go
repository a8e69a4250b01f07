package main

import (
	"slices"
	"testing"

	"github.com/go-stomp/stomp/v3/frame"
)

func TestParseFlagsAddrs(t *testing.T) {
	c, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"127.0.0.1:61613"}; !slices.Equal(c.addrs, want) || !slices.Equal(c.consumerAddrs, want) {
		t.Fatalf("defaults: addrs %q consumerAddrs %q", c.addrs, c.consumerAddrs)
	}

	c, err = parseFlags([]string{"-addr", "127.0.0.1:1, 127.0.0.1:2,127.0.0.1:3"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"}
	if !slices.Equal(c.addrs, want) || !slices.Equal(c.consumerAddrs, want) {
		t.Fatalf("list: addrs %q consumerAddrs %q", c.addrs, c.consumerAddrs)
	}
	if c.addr != "127.0.0.1:1, 127.0.0.1:2,127.0.0.1:3" {
		t.Fatalf("addr %q: want the flag as given", c.addr)
	}

	c, err = parseFlags([]string{"-addr", "127.0.0.1:1", "-consumer-addr", "127.0.0.1:2,127.0.0.1:3"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(c.addrs, []string{"127.0.0.1:1"}) || !slices.Equal(c.consumerAddrs, []string{"127.0.0.1:2", "127.0.0.1:3"}) {
		t.Fatalf("consumer-addr: addrs %q consumerAddrs %q", c.addrs, c.consumerAddrs)
	}

	for _, args := range [][]string{
		{"-addr", "127.0.0.1:1,"},
		{"-addr", "nohostport"},
		{"-consumer-addr", "127.0.0.1:1,,127.0.0.1:2"},
		{"-mode", "backlog", "-count", "10", "-addr", "127.0.0.1:1,127.0.0.1:2", "-broker", "x"},
	} {
		if _, err := parseFlags(args); err == nil {
			t.Errorf("%q: no error", args)
		}
	}
}

func TestParseFlagsHeaders(t *testing.T) {
	c, err := parseFlags([]string{"-header", "x-queue-type:quorum", "-header", "durable:true", "-header", "x-empty:", "-header", "x-colon:a:b"})
	if err != nil {
		t.Fatal(err)
	}
	want := headerList{{"x-queue-type", "quorum"}, {"durable", "true"}, {"x-empty", ""}, {"x-colon", "a:b"}}
	if !slices.Equal(c.headers, want) {
		t.Fatalf("headers %q, want %q", c.headers, want)
	}
	f := frame.New(frame.SEND)
	c.headers.addTo(f)
	if f.Header.Get("x-queue-type") != "quorum" || f.Header.Get("durable") != "true" || f.Header.Get("x-colon") != "a:b" {
		t.Fatalf("frame headers %v", f.Header)
	}
	for _, h := range []string{"novalue", ":v", "x:a\nb"} {
		if _, err := parseFlags([]string{"-header", h}); err == nil {
			t.Errorf("-header %q: no error", h)
		}
	}
}
