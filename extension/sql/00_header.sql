/*
 * crmpay--1.0.sql (assembled by the Makefile from the parts in extension/sql)
 *	  Install script: tables, the payment state machine, the SQL API and
 *	  the privileges of the three crmpay roles.  Each part grants its own
 *	  objects to the crmpay roles; 99_privileges.sql runs last and takes
 *	  everything from PUBLIC.
 *
 *	  Conventions: functions whose name starts with "_" are internal and
 *	  granted to nobody; the public API functions that need more rights
 *	  than their callers have are SECURITY DEFINER with a pinned
 *	  search_path.  No SQL is ever built from user or gateway data.
 */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION crmpay" to load this file. \quit
