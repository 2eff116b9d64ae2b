package qerr

import (
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestAs(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want *Error
	}{
		{"nil", nil, nil},
		{"plain", errors.New("boom"), &Error{GenericError, "boom"}},
		{"direct", New(CommandNotFound, "x"), &Error{CommandNotFound, "x"}},
		{"wrapped", fmt.Errorf("ctx: %w", Generic("n=%d", 3)), &Error{GenericError, "n=3"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, As(tc.err))
		})
	}
}
