// Package test holds brokerd's integration tests: brokers driven through
// real TCP by go-stomp's client and by raw frames (TestBroker*, TestProtocol*),
// real brokerd processes for flags, signals and crashes (TestProcess*),
// and a client that is not Go (TestPython*).
package test
