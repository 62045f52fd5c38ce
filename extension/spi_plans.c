/*-------------------------------------------------------------------------
 *
 * spi_plans.c
 *	  The SPI helpers every module uses: statements prepared once per
 *	  backend and kept (saved plans, invalidated by the plan cache when the
 *	  tables change), running one with its result checked, and text
 *	  parameters that may be NULL.
 *
 *-------------------------------------------------------------------------
 */
#include "crmpay.h"

#include "executor/spi.h"
#include "utils/builtins.h"

/*
 * crmpay_saved_plan
 *		Returns the plan in *slot, preparing and keeping it on first use.
 *		Call it while connected to SPI.
 */
SPIPlanPtr
crmpay_saved_plan(SPIPlanPtr *slot, const char *sql, int nargs, const Oid *types)
{
	if (*slot == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(sql, nargs, (Oid *) types);

		if (plan == NULL)
			elog(ERROR, "crmpay: SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		*slot = plan;
	}
	return *slot;
}

/*
 * crmpay_spi_run
 *		Executes a plan (arguments as SPI_execute_plan's) and raises, naming
 *		what the statement was for, unless SPI answers expected_rc.
 */
void
crmpay_spi_run(SPIPlanPtr plan, Datum *values, const char *nulls, bool read_only, long count,
			   int expected_rc, const char *what)
{
	int			rc = SPI_execute_plan(plan, values, nulls, read_only, count);

	if (rc != expected_rc)
		elog(ERROR, "crmpay: %s failed: %s", what, SPI_result_code_string(rc));
}

/* A text parameter: the string, or NULL (sets *isnull to 'n' or ' '). */
Datum
crmpay_text_param(const char *s, char *isnull)
{
	*isnull = s ? ' ' : 'n';
	return s ? CStringGetTextDatum(s) : (Datum) 0;
}
