#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "core/fmt.h"

static size_t seq(const char *s, size_t n)
{
    return sl_utf8_seq_len((const unsigned char *)s, n);
}

/* RFC 3629's table: the shortest form only, no surrogates, nothing above U+10FFFF. */
static void test_utf8_seq_len(void **state)
{
    (void)state;
    assert_int_equal(seq("a", 1), 1);
    assert_int_equal(seq("\0", 1), 1);
    assert_int_equal(seq("\xc3\xa9", 2), 2);         /* é */
    assert_int_equal(seq("\xe2\x82\xac", 3), 3);     /* € */
    assert_int_equal(seq("\xf0\x9f\x98\x80", 4), 4); /* U+1F600 */
    assert_int_equal(seq("\xf4\x8f\xbf\xbf", 4), 4); /* U+10FFFF */
    assert_int_equal(seq("\xc3\xa9", 1), 0);         /* cut short */
    assert_int_equal(seq("\xe2\x82", 2), 0);
    assert_int_equal(seq("\x80", 1), 0);     /* stray continuation */
    assert_int_equal(seq("\xc0\xaf", 2), 0); /* overlong '/' */
    assert_int_equal(seq("\xc1\xbf", 2), 0);
    assert_int_equal(seq("\xe0\x80\xaf", 3), 0);     /* overlong */
    assert_int_equal(seq("\xed\xa0\x80", 3), 0);     /* surrogate U+D800 */
    assert_int_equal(seq("\xf0\x80\x80\xaf", 4), 0); /* overlong */
    assert_int_equal(seq("\xf4\x90\x80\x80", 4), 0); /* above U+10FFFF */
    assert_int_equal(seq("\xf5\x80\x80\x80", 4), 0);
    assert_int_equal(seq("\xe2\x28\xa1", 3), 0); /* bad second byte */
    assert_int_equal(seq("\xe2\x82\x28", 3), 0); /* bad third byte */
    assert_int_equal(seq("\xff", 1), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_utf8_seq_len),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
