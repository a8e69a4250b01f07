// Package config builds a node's Config once at start, from four layers, each
// overriding the one before:
//
//  1. Default(): every field set;
//  2. the YAML file named by --config, nested as in brokerd.example.yaml;
//  3. the environment: BROKERD_ + the key upper-cased, dots as underscores
//     (stomp.addr is BROKERD_STOMP_ADDR);
//  4. the command-line flags that were set (pflag's Changed).
//
// Every setting has one key ("stomp.addr", "limits.max_body_size"); the file,
// the environment, the flags and every error name settings by that key. A key
// that matches no setting, in the file or as a BROKERD_ variable, is an error
// rather than silently ignored, so that a typo cannot leave a default in force.
//
// Load reads everything once, with its own viper instance (never viper's
// global), and returns a validated Config. The result is a plain value: nothing
// in this package watches the file or the environment afterwards, and nothing
// here is global or mutable.
//
// Value syntax, in the environment and in the file: durations in Go syntax
// ("250ms", "10s"; a bare 0 is also accepted), integers in decimal, sizes in
// bytes (keys such as store.min_free_bytes) as an integer or a whole number
// with a unit ("256MiB", "4KiB", "1GB"), booleans true or false, lists
// (cluster.join) as a YAML list or a comma-separated string.
package config
