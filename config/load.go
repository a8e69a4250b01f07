package config

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// configFlag names the flag that names the config file.
const configFlag = "config"

// RegisterFlags adds to fs --config FILE and one flag for each frequently
// changed key (--stomp-addr for stomp.addr, ...). Each flag's default is
// Default()'s value and its usage names its key. Like pflag, it panics if fs
// already has a flag of one of these names.
func RegisterFlags(fs *pflag.FlagSet) {
	fs.String(configFlag, "", "YAML config file; see brokerd.example.yaml")
	d := Default()
	for _, s := range settings {
		if s.flag == "" {
			continue
		}
		usage := fmt.Sprintf("%s (%s)", s.help, s.key)
		switch p := s.field(&d).(type) {
		case *string:
			fs.String(s.flag, *p, usage)
		case *int:
			fs.Int(s.flag, *p, usage)
		case *int64:
			fs.Int64(s.flag, *p, usage)
		case *bool:
			fs.Bool(s.flag, *p, usage)
		case *time.Duration:
			fs.Duration(s.flag, *p, usage)
		case *[]string:
			fs.StringSlice(s.flag, *p, usage)
		default:
			panic(fmt.Sprintf("config: key %s has unsupported type %T", s.key, p))
		}
	}
}

// Load builds the configuration, each layer overriding the one before:
// Default(), then the YAML file named by the --config flag if it is set, then
// the BROKERD_ variables in environ, then the flags set on the command line
// (fs.Changed). environ is in os.Environ() form; Load reads no other
// environment. fs holds flags added by RegisterFlags and already parsed; it
// may be nil, for no file and no flags.
//
// Load returns a Config that passes Validate, or an error listing every
// problem it found, one per line, each naming the file, variable or key at
// fault. Problems with values are *KeyError; keys that match no setting wrap
// ErrUnknownKey.
func Load(fs *pflag.FlagSet, environ []string) (Config, error) {
	c := Default()
	origin := make(map[string]string) // key -> where its value came from, for errors
	var errs []error

	if path := configPath(fs); path != "" {
		fileErrs, err := applyFile(&c, origin, path)
		if err != nil {
			return Config{}, err
		}
		errs = append(errs, fileErrs...)
	}
	errs = append(errs, applyEnv(&c, origin, environ)...)
	if fs != nil {
		errs = append(errs, applyFlags(&c, origin, fs)...)
	}
	if len(errs) > 0 {
		return Config{}, errors.Join(errs...)
	}

	if errs := c.problems(); len(errs) > 0 {
		for i, err := range errs {
			var ke *KeyError
			if errors.As(err, &ke) && origin[ke.Key] != "" {
				errs[i] = fmt.Errorf("config: %w (%s)", err, origin[ke.Key])
			} else {
				errs[i] = fmt.Errorf("config: %w", err)
			}
		}
		return Config{}, errors.Join(errs...)
	}
	return c, nil
}

// configPath returns the value of --config, or "" when fs is nil, lacks the
// flag or it is empty.
func configPath(fs *pflag.FlagSet) string {
	if fs == nil || fs.Lookup(configFlag) == nil {
		return ""
	}
	path, _ := fs.GetString(configFlag)
	return path
}

// applyFile sets in c every key found in the YAML file at path, and records
// in origin that the file set it. It returns err if the file cannot be read
// or parsed, and otherwise one error for each key that matches no setting or
// has a value of the wrong type.
func applyFile(c *Config, origin map[string]string, path string) (keyErrs []error, err error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err) // names the file
	}
	v := viper.New()
	v.SetConfigType("yaml")
	if err := v.ReadConfig(bytes.NewReader(data)); err != nil {
		return nil, fmt.Errorf("config: %s: %w", path, err)
	}

	keys := v.AllKeys() // lower-cased, nested keys joined with dots
	slices.Sort(keys)
	for _, key := range keys {
		raw := v.Get(key)
		s, ok := lookupKey(key)
		switch {
		case ok:
			if err := decode(s.field(c), raw, sizeKeys[s.key]); err != nil {
				keyErrs = append(keyErrs, fmt.Errorf("config: %s: %w", path, &KeyError{Key: key, Err: err}))
			}
			origin[key] = "set in " + path
		case isSection(key) && raw == nil:
			// "stomp:" with nothing under it
		case isSection(key):
			keyErrs = append(keyErrs, fmt.Errorf("config: %s: %s: must hold keys such as %s.*, got %s", path, key, key, describe(raw)))
		default:
			keyErrs = append(keyErrs, fmt.Errorf("config: %s: %w %q%s", path, ErrUnknownKey, key, didYouMean(key, allKeys())))
		}
	}
	return keyErrs, nil
}

// applyEnv sets in c every key named by a BROKERD_ variable in environ, and
// records the variable in origin. As with os.Getenv, the first of two entries
// with the same name counts.
func applyEnv(c *Config, origin map[string]string, environ []string) []error {
	byName := make(map[string]setting, len(settings))
	names := make([]string, 0, len(settings))
	for _, s := range settings {
		byName[envName(s.key)] = s
		names = append(names, envName(s.key))
	}

	var errs []error
	seen := make(map[string]bool)
	for _, kv := range environ {
		name, val, ok := strings.Cut(kv, "=")
		if !ok || !strings.HasPrefix(name, envPrefix) || seen[name] {
			continue
		}
		seen[name] = true
		s, ok := byName[name]
		if !ok {
			errs = append(errs, fmt.Errorf("config: environment variable %s: %w%s", name, ErrUnknownKey, didYouMean(name, names)))
			continue
		}
		if err := decode(s.field(c), val, sizeKeys[s.key]); err != nil {
			errs = append(errs, fmt.Errorf("config: environment variable %s: %w", name, &KeyError{Key: s.key, Err: err}))
		}
		origin[s.key] = "set by " + name
	}
	return errs
}

// applyFlags sets in c the key of every flag that was set on the command
// line, and records the flag in origin. A flag left at its default does not
// override the file or the environment.
func applyFlags(c *Config, origin map[string]string, fs *pflag.FlagSet) []error {
	var errs []error
	for _, s := range settings {
		if s.flag == "" || !fs.Changed(s.flag) {
			continue
		}
		var err error
		switch p := s.field(c).(type) {
		case *string:
			*p, err = fs.GetString(s.flag)
		case *int:
			*p, err = fs.GetInt(s.flag)
		case *int64:
			*p, err = fs.GetInt64(s.flag)
		case *bool:
			*p, err = fs.GetBool(s.flag)
		case *time.Duration:
			*p, err = fs.GetDuration(s.flag)
		case *[]string:
			var list []string
			list, err = fs.GetStringSlice(s.flag)
			if err == nil {
				*p, err = toStrings(list)
			}
		}
		if err != nil { // only when fs has a flag of this name but another type
			errs = append(errs, fmt.Errorf("config: flag --%s: %w", s.flag, &KeyError{Key: s.key, Err: err}))
		}
		origin[s.key] = "set by --" + s.flag
	}
	return errs
}

func allKeys() []string {
	keys := make([]string, len(settings))
	for i, s := range settings {
		keys[i] = s.key
	}
	return keys
}

// didYouMean returns ` (did you mean "x"?)` for the candidate closest to
// name, or "" if none is close.
func didYouMean(name string, candidates []string) string {
	if s := suggest(name, candidates); s != "" {
		return fmt.Sprintf(" (did you mean %q?)", s)
	}
	return ""
}

// decode stores raw, a value from the file or the environment, in dst, one
// of the pointers that setting.field returns; size allows units (sizeKeys).
// Its error describes the value, not the key.
func decode(dst any, raw any, size bool) error {
	var err error
	switch p := dst.(type) {
	case *string:
		*p, err = toString(raw)
	case *int:
		if !size {
			*p, err = toInt(raw)
			break
		}
		var n int64
		n, err = toSize(raw)
		if err == nil && n > math.MaxInt {
			err = fmt.Errorf("%s is too large", describe(raw))
		}
		*p = int(n)
	case *int64:
		if size {
			*p, err = toSize(raw)
		} else {
			*p, err = toInt64(raw)
		}
	case *bool:
		*p, err = toBool(raw)
	case *time.Duration:
		*p, err = toDuration(raw)
	case *[]string:
		*p, err = toStrings(raw)
	default:
		err = fmt.Errorf("unsupported type %T", dst)
	}
	return err
}

// toString accepts a string; nil (a key with no value in YAML) is "". Other
// scalars are refused rather than converted, so that 007 does not silently
// become "7".
func toString(raw any) (string, error) {
	switch v := raw.(type) {
	case nil:
		return "", nil
	case string:
		return v, nil
	case []any, map[string]any:
		return "", fmt.Errorf("%s is not a string", describe(raw))
	}
	return "", fmt.Errorf("%s is not a string (quote it)", describe(raw))
}

// toInt accepts a decimal integer, as a number or a string.
func toInt(raw any) (int, error) {
	switch v := raw.(type) {
	case int:
		return v, nil
	case int64:
		if v >= math.MinInt && v <= math.MaxInt {
			return int(v), nil
		}
	case uint64:
		if v <= math.MaxInt {
			return int(v), nil
		}
	case float64:
		if v == math.Trunc(v) && v >= math.MinInt && v < math.MaxInt {
			return int(v), nil
		}
	case string:
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err == nil {
			return n, nil
		}
	}
	return 0, fmt.Errorf("%s is not an integer", describe(raw))
}

// toInt64 accepts a decimal integer, as a number or a string.
func toInt64(raw any) (int64, error) {
	switch v := raw.(type) {
	case int:
		return int64(v), nil
	case int64:
		return v, nil
	case uint64:
		if v <= math.MaxInt64 {
			return int64(v), nil
		}
	case float64:
		if v == math.Trunc(v) && v >= math.MinInt64 && v < math.MaxInt64 {
			return int64(v), nil
		}
	case string:
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if err == nil {
			return n, nil
		}
	}
	return 0, fmt.Errorf("%s is not an integer", describe(raw))
}

// sizeUnits are the units toSize accepts, binary and decimal.
var sizeUnits = map[string]int64{
	"B":   1,
	"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
	"kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
}

// toSize accepts a number of bytes: an integer, as a number or a string, or
// a string of a whole number and a unit ("256MiB", "4 MiB", "1GB"). Units are
// case-sensitive, so that "mb" (millibits?) is refused rather than guessed.
func toSize(raw any) (int64, error) {
	s, ok := raw.(string)
	if !ok {
		n, err := toInt64(raw)
		if err != nil {
			return 0, fmt.Errorf(`%s is not a size in bytes, like 4096 or "256MiB"`, describe(raw))
		}
		return n, nil
	}
	t := strings.TrimSpace(s)
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '-' && r != '+' })
	num, unit := t, ""
	if i >= 0 {
		num, unit = t[:i], strings.TrimSpace(t[i:])
	}
	n, err := strconv.ParseInt(num, 10, 64)
	mult, known := sizeUnits[unit]
	if unit == "" {
		mult, known = 1, true
	}
	if err != nil || !known {
		return 0, fmt.Errorf(`%s is not a size in bytes, like 4096 or "256MiB" (units B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)`, describe(raw))
	}
	if n > math.MaxInt64/mult || n < math.MinInt64/mult {
		return 0, fmt.Errorf("%s is too large", describe(raw))
	}
	return n * mult, nil
}

// toBool accepts true or false, as a boolean or a string (strconv.ParseBool).
func toBool(raw any) (bool, error) {
	switch v := raw.(type) {
	case bool:
		return v, nil
	case string:
		b, err := strconv.ParseBool(strings.TrimSpace(v))
		if err == nil {
			return b, nil
		}
	}
	return false, fmt.Errorf("%s is not true or false", describe(raw))
}

// toDuration accepts Go syntax ("250ms", "10s") and the number 0. Other bare
// numbers are refused: 10 would be ten nanoseconds, surely not what was meant.
func toDuration(raw any) (time.Duration, error) {
	switch v := raw.(type) {
	case time.Duration:
		return v, nil
	case string:
		d, err := time.ParseDuration(strings.TrimSpace(v))
		if err == nil {
			return d, nil
		}
	case int:
		if v == 0 {
			return 0, nil
		}
	case int64:
		if v == 0 {
			return 0, nil
		}
	case uint64:
		if v == 0 {
			return 0, nil
		}
	case float64:
		if v == 0 {
			return 0, nil
		}
	}
	return 0, fmt.Errorf(`%s is not a duration with a unit, like "250ms" or "10s"`, describe(raw))
}

// toStrings accepts a list of strings, or one string of comma-separated
// entries. It trims spaces and drops empty entries; no entries is nil.
func toStrings(raw any) ([]string, error) {
	var parts []string
	switch v := raw.(type) {
	case nil:
	case string:
		parts = strings.Split(v, ",")
	case []string:
		parts = v
	case []any:
		for i, e := range v {
			s, ok := e.(string)
			if !ok {
				return nil, fmt.Errorf("entry %d: %s is not a string (quote it)", i, describe(e))
			}
			parts = append(parts, s)
		}
	default:
		return nil, fmt.Errorf("%s is not a list", describe(raw))
	}
	var list []string
	for _, p := range parts {
		for _, e := range strings.Split(p, ",") {
			if e = strings.TrimSpace(e); e != "" {
				list = append(list, e)
			}
		}
	}
	return list, nil
}

// describe shows a value in an error: strings quoted, anything else as Go
// prints it.
func describe(raw any) string {
	if s, ok := raw.(string); ok {
		return strconv.Quote(s)
	}
	return fmt.Sprintf("%v", raw)
}
