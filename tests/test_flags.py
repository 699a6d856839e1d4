"""Every flag of every command-line tool has a test that fails when the flag is ignored
(the run behaves as if it were not given), through the path a user takes: the tool in
this process, or the library function it calls with its parsed arguments.

COVERED names those tests (functions of any tests/test_*.py). A tool that gains a flag
fails here until the flag is given a test; a test that is renamed or removed fails here
until the table follows.
"""

import ast
from pathlib import Path

import pytest

import app
import compute_ae_scale
import distill
import evaluate
import export_model
import precompute_latents
import sample
import train_autoencoder
import train_latent_diffusion

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
TOOLS = {'train_latent_diffusion.py': train_latent_diffusion, 'sample.py': sample,
         'precompute_latents.py': precompute_latents, 'compute_ae_scale.py': compute_ae_scale,
         'export_model.py': export_model, 'evaluate.py': evaluate, 'distill.py': distill,
         'train_autoencoder.py': train_autoencoder, 'app.py': app}

TRAIN_RUN = 'test_a_run_writes_checkpoints_demo_grids_and_loss'
TRAIN_DDP = 'test_two_process_cpu_ddp_keeps_both_ranks_identical_and_logs_the_images_of_both'
TRAIN_LOADER = 'test_the_training_loader_follows_random_flip_and_prefetch_factor'
CACHE_LOADER = 'test_the_cache_loader_follows_batch_size_num_workers_and_prefetch_factor'
LIGHTNING = 'test_the_run_asks_lightning_for_the_nodes_strategy_accelerator_and_precision'
FROZEN = 'test_frozen_models_stay_in_eval_mode_and_untrained'
OTHER_FROZEN = 'test_a_cache_made_with_other_models_or_size_is_refused'
RECORD = 'test_checkpoints_leave_out_the_frozen_models_and_say_how_to_rebuild'
RESUME = 'test_resume_continues_at_the_exact_step_with_optimizer_ema_and_new_lr'
SEED = 'test_demo_grids_do_not_change_the_training_random_stream'
SPEED = 'test_each_speed_flag_takes_effect_and_saves_a_checkpoint_a_plain_model_loads'
DEMO = 'test_the_demo_flags_choose_the_demo_sampler_schedule_steps_and_size'
LR = 'test_the_lr_schedule_flags_set_the_lr_of_each_step'
BUCKET_FLAGS = 'test_the_bucket_flags_choose_the_shapes_and_the_crop'
BUCKET_EDGES = 'test_a_wide_images_left_and_right_edges_both_reach_the_batch'
BUCKET_DDP = 'test_two_ranks_train_on_buckets_with_equal_batches_and_each_image_once'

SAMPLE_CLI = 'test_cli_writes_images_grid_and_metadata_and_reads_the_scale'
SAMPLER = 'test_cli_sampler_flags_set_what_the_sampler_runs'
GUIDANCE = 'test_prompts_without_a_weight_are_guided_at_cond_scale_and_image_prompts_guide'
SAMPLE_ERRORS = 'test_cli_user_errors'  # (test_sample.py's)
PROMPTS_FILE = 'test_prompts_file_samples_each_line_with_one_load_of_the_models'
WIDTHS = 'test_width_flags_override_but_must_fit'
GRIDS = 'test_grid_only_and_no_grid'

CACHE = 'test_the_cache_holds_every_readable_image_once_with_its_posterior_and_embedding'
RERUN = 'test_a_rerun_encodes_only_the_parts_an_interrupted_run_left_unfinished'
FABRIC = 'test_precompute_asks_fabric_for_the_nodes_and_processes_of_its_flags'
KILLED = 'test_killed_precompute_resumes_on_two_processes_to_the_same_cache'
BUCKETED_CACHE = 'test_each_record_is_its_image_fitted_to_its_bucket'
BUCKETED_RERUN = 'test_a_rerun_with_other_bucket_settings_is_refused'

SCALE_CLI = 'test_cli_prints_the_scale_and_the_flag_from_any_directory'
SCALE_JSON = 'test_cli_json'
SCALE_SEED = 'test_cli_seed_workers_and_device_are_the_estimates'
SCALE_GAP = 'test_compute_ae_scale_reports_the_gap_precompute_puts_in_the_manifest'

EXPORT = 'test_the_export_holds_the_ema_weights_and_the_settings'
PUSH = 'test_push_to_hub_uploads_the_export_its_card_and_sample_grid_and_nothing_else'
CARD_ONLY = 'test_card_only_writes_the_card_of_an_adapter_or_a_student_and_uploads_nothing'
PUSH_REFUSED = 'test_push_refusals_are_one_line_exit_2'
FROM_HUB = 'test_sample_py_from_hub_names_gives_the_pixels_of_the_local_files'
HUB_ERRORS = 'test_what_cannot_be_had_from_the_hub_is_one_line_exit_2'
HUB_FLAGS = 'test_training_and_distillation_resolve_their_model_flags_before_any_model_loads'
SPACE = 'test_the_space_folder_runs_here_and_answers_with_sample_pys_pixels'
SPACE_PUSH = 'test_push_to_hub_uploads_the_model_then_the_space_folder_as_a_space_and_nothing_else'
SPACE_REFUSED = 'test_refusals_are_one_line_exit_2_before_anything_is_written'

TABLE = 'test_the_table_flags_reach_the_set_each_tool_reads'

LORA_RUN = 'test_a_lora_run_checkpoints_the_adapters_and_the_base_identity_and_keeps_the_base'
LORA_RESUME = 'test_sigterm_then_resume_auto_of_a_lora_run_from_a_cache_continues_bit_for_bit'
LORA_SAMPLE = 'test_sample_py_lora_applies_the_adapter_at_its_strength_and_refuses_another_base'
LORA_MERGE = 'test_the_adapter_file_round_trips_and_the_merge_matches_it_with_the_original_keys'

EVALUATE = 'test_the_report_holds_every_checkpoint_in_order_with_its_numbers'
SAME_AS_SAMPLE = 'test_the_same_model_gives_the_same_images_in_every_column_and_those_of_sample_py'
EVALUATE_FLAGS = 'test_the_sampling_flags_reach_every_column_as_they_reach_sample_py'
EVALUATE_ERRORS = 'test_user_errors'  # (test_evaluate.py's too)
OWN_SAMPLERS = 'test_each_checkpoint_samples_with_its_own_sampler_and_each_column_says_which'
LABELS = 'test_column_labels_are_unique_and_the_page_shows_the_grids_enlarged_and_sharp'

DISTILL = 'test_each_flag_reaches_the_trainer_module_loader_or_callback_it_sets'
INTERRUPTED = 'test_an_interrupted_distillation_resumes_in_its_stage_and_round'
STUDENTS = 'test_each_stage_writes_its_student_and_the_last_is_student_ckpt'
DISTILL_ERRORS = 'test_usage_errors_before_any_model_loads'

AUTOENCODER = 'test_each_flag_reaches_the_trainer_module_loss_loader_or_callback_it_sets'
DECODER_ONLY = 'test_decoder_only_keeps_the_encoder_bit_identical_and_the_latents_unchanged'
VALIDATION = 'test_validation_logs_the_starting_values_at_step_0_then_every_val_every'
DISC = 'test_the_discriminator_trains_from_disc_start_on_and_not_before'
AE_SIGTERM = 'test_sigterm_saves_writes_the_autoencoder_and_resume_auto_continues'
LPIPS_OFFLINE = 'test_a_missing_lpips_weight_offline_is_one_line_exit_2'
FULL = 'test_full_changes_the_encoder_says_so_and_prints_the_new_scale'
# The flags each set-up test (DISTILL, AUTOENCODER) checks where the run uses them.
SHARED = ['--batch-size', '--num-workers', '--prefetch-factor', '--lr', '--lr-warmup-steps',
          '--lr-schedule', '--lr-min', '--accumulate-grad-batches', '--grad-clip',
          '--max-bad-steps', '--output-dir', '--seed', '--checkpoint-every',
          '--checkpoint-minutes', '--keep-last', '--signal', '--wandb-project', '--num-gpus',
          '--num-nodes', '--accelerator', '--strategy', '--fprecision', '--image-size',
          '--vqgan-model']

# tool -> flag (its first option string, or a positional argument's name) -> tests
COVERED = {
    'train_latent_diffusion.py': {
        '--demo': ['test_the_readme_demo_runs_offline_from_any_directory',
                   'test_the_demo_refuses_flags_it_would_ignore'],
        '--cloob-checkpoint': [FROZEN, OTHER_FROZEN],
        '--vqgan-model': [FROZEN, OTHER_FROZEN],
        '--autoencoder-scale': [RECORD, 'test_resume_from_a_checkpoint_of_the_original_script'],
        '--train-set': ['test_bad_image_files_are_skipped_and_counted', TRAIN_LOADER],
        '--checkpoint-every': [TRAIN_RUN],
        '--resume-from': [RESUME, 'test_finetune_from_a_released_state_dict', HUB_FLAGS,
                          'test_sigterm_saves_the_step_and_resume_auto_continues_as_if_never_'
                          'stopped'],
        '--demo-prompts': [TRAIN_RUN, 'test_every_demo_grid_logs_its_cloob_score'],
        '--demo-every': [TRAIN_RUN, SEED],
        '--wandb-project': ['test_wandb_offline_run_logs_the_demo_grid_and_prompts'],
        '--fprecision': [LIGHTNING, SPEED],
        '--num-gpus': [TRAIN_DDP,
                       'test_two_ranks_with_two_workers_see_every_sample_once_per_epoch'],
        '--num-workers': [TRAIN_LOADER, CACHE_LOADER, SPEED],
        '--batch-size': ['test_bad_image_files_are_skipped_and_counted', CACHE_LOADER],
        '--base-channels': [RECORD],
        '--channel-multipliers': [RECORD],
        '--ema-decay-at': ['test_ema_decay_at_sets_when_the_average_slows_to_0_9999'],
        '--train-latents': ['test_training_from_the_cache_leaves_the_encoder_and_image_tower_out'],
        '--num-nodes': [LIGHTNING],
        '--accelerator': [LIGHTNING, 'test_devices_that_are_not_there'],
        '--strategy': [LIGHTNING],
        '--lr': [RESUME, 'test_grad_clip_limits_the_update'],
        '--lr-warmup-steps': ['test_the_lr_warmup_continues_on_resume_and_is_logged'],
        '--lr-schedule': [LR],
        '--lr-min': [LR],
        '--random-flip': [TRAIN_LOADER],
        '--aspect-buckets': [BUCKET_EDGES, BUCKET_DDP],
        '--bucket-step': [BUCKET_FLAGS],
        '--max-aspect': [BUCKET_FLAGS],
        '--bucket-crop': [BUCKET_FLAGS],
        '--max-steps': [TRAIN_RUN],
        '--output-dir': [TRAIN_RUN],
        '--seed': ['test_the_seed_picks_the_timesteps', SEED],
        '--accumulate-grad-batches': ['test_accumulate_grad_batches_makes_one_step_of_that_many_'
                                      'batches'],
        '--grad-clip': ['test_grad_clip_limits_the_update'],
        '--image-size': [TRAIN_RUN, TRAIN_DDP],
        '--demo-steps': [DEMO],
        '--demo-method': [DEMO],
        '--demo-schedule': [DEMO],
        '--demo-size': [DEMO],
        '--checkpoint-minutes': ['test_checkpoint_minutes_writes_last_between_step_checkpoints'],
        '--keep-last': ['test_keep_last_prunes_old_step_checkpoints'],
        '--signal': ['test_the_signal_flag_chooses_the_warning_signal'],
        '--peak-tflops': [TRAIN_DDP],
        '--compile': [SPEED],
        '--channels-last': [SPEED],
        '--tf32': [SPEED],  # and --no-tf32
        '--gradient-checkpointing': [SPEED],
        '--prefetch-factor': [TRAIN_LOADER, CACHE_LOADER, SPEED],
        '--max-bad-steps': ['test_repeated_non_finite_losses_stop_the_run_with_the_last_good_'
                            'checkpoint'],
        '--image-column': [TABLE],
        '--dataset-split': [TABLE],
        '--caption-column': ['test_training_from_images_reads_the_caption_column_it_is_given'],
        '--text-prob': ['test_a_captioned_cache_trains_with_text_prob',
                        'test_training_from_images_reads_the_caption_column_it_is_given',
                        'test_an_old_cache_trains_at_text_prob_0_and_is_refused_above'],
        '--optimizer': ['test_adamw8bit_steps_with_uint8_moments_and_they_are_saved',
                        'test_adamw8bit_is_refused_in_one_line_where_it_cannot_run',
                        'test_the_cpu_ema_and_8bit_adamw_resume_as_if_never_stopped'],
        '--ema-device': ['test_the_cpu_ema_is_the_ema_of_a_plain_run_and_stays_on_the_cpu',
                         'test_the_printed_model_states_are_those_of_the_tensors',
                         'test_the_cpu_ema_and_8bit_adamw_resume_as_if_never_stopped'],
        '--lora-rank': [LORA_RUN, LORA_RESUME, 'test_a_lora_checkpoint_of_another_base_or_rank_'
                        'is_refused'],
        '--lora-alpha': [LORA_RUN],
        '--lora-targets': [LORA_RUN],
    },
    'sample.py': {
        'prompts': [PROMPTS_FILE, 'test_score_of_several_prompts_is_against_their_weighted_mean'],
        '--images': [GUIDANCE],
        '--cloob-checkpoint': [SAMPLE_CLI, SAMPLE_ERRORS, HUB_ERRORS],
        '--autoencoder': [SAMPLE_CLI, SAMPLE_ERRORS, FROM_HUB, HUB_ERRORS],
        '--checkpoint': ['test_cli_samples_at_the_image_size_the_checkpoint_records',
                         'test_sample_py_gives_the_checkpoints_images_from_the_export', FROM_HUB,
                         HUB_ERRORS],
        '--base-channels': [SAMPLE_ERRORS, WIDTHS],
        '--channel-multipliers': [SAMPLE_ERRORS, WIDTHS],
        '--cond-scale': [GUIDANCE],
        '--device': [GUIDANCE],
        '--eta': [SAMPLER],
        '--method': [SAMPLER],
        '-n': [SAMPLE_CLI],
        '--seed': [SAMPLE_CLI],
        '--steps': [SAMPLER],
        '--prompts-file': [PROMPTS_FILE],
        '--schedule': [SAMPLER],
        '--autoencoder-scale': [SAMPLE_CLI],
        '--size': [SAMPLE_CLI, 'test_cli_samples_at_any_size_and_the_pngs_say_which'],
        '--batch-size': ['test_batches_of_16_unless_told_with_the_same_noise'],
        '--output-dir': [SAMPLE_CLI],
        '--prefix': [SAMPLE_CLI],
        '--grid-cols': [SAMPLE_CLI],
        '--grid-only': [GRIDS],
        '--no-grid': [GRIDS],
        '--score': ['test_score_is_higher_for_each_image_with_its_own_prompt'],
        '--init': [SAMPLER, 'test_cli_init_image'],
        '--strength': [SAMPLER, SAMPLE_ERRORS],
        '--lora': [LORA_SAMPLE, FROM_HUB, HUB_ERRORS],
    },
    'precompute_latents.py': {
        '--train-set': [CACHE],
        '--vqgan-model': [CACHE, 'test_a_rerun_with_other_settings_into_the_same_cache_is_refused'],
        '--cloob-checkpoint': [CACHE],
        '--output': [CACHE],
        '--image-size': [CACHE],
        '--batch-size': [RERUN],
        '--num-workers': [RERUN],
        '--device': [RERUN],
        '--num-gpus': [KILLED],
        '--num-nodes': [FABRIC],
        '--shard-size': ['test_the_manifest_records_what_made_the_cache_and_the_scale', KILLED],
        '--json': [RERUN],
        '--image-column': [TABLE, 'test_a_column_that_holds_no_images_is_one_line_exit_2'],
        '--dataset-split': [TABLE],
        '--caption-column': ['test_precompute_reads_the_caption_column_it_is_given'],
        '--aspect-buckets': [BUCKETED_CACHE],
        '--bucket-step': [BUCKETED_RERUN],
        '--max-aspect': [BUCKETED_CACHE, BUCKETED_RERUN],
        '--bucket-crop': [BUCKETED_CACHE, BUCKETED_RERUN],
    },
    'compute_ae_scale.py': {
        'vqgan_model': [SCALE_CLI],
        'train_set': [SCALE_CLI],
        '--batches': [SCALE_JSON],
        '--batch-size': [SCALE_JSON],
        '--image-size': [SCALE_CLI],
        '--num-workers': [SCALE_SEED],
        '--device': [SCALE_SEED],
        '--seed': [SCALE_SEED],
        '--json': [SCALE_JSON],
        '--image-column': [TABLE],
        '--dataset-split': [TABLE],
        '--captions': [SCALE_GAP],
        '--cloob-checkpoint': [SCALE_GAP],
        '--caption-column': [SCALE_GAP],
    },
    'export_model.py': {
        'checkpoint': [EXPORT],
        'output': [EXPORT],
        '--dtype': [EXPORT],
        '--push-to-hub': [PUSH, PUSH_REFUSED],
        '--private': [PUSH, PUSH_REFUSED],
        '--card-only': [CARD_ONLY],
        '--card-prompts': [PUSH, CARD_ONLY],
        '--no-card-grid': [CARD_ONLY, 'test_a_grid_whose_models_are_not_here_is_refused_before_'
                           'the_export'],
        '--license': [CARD_ONLY],
        '--space': [SPACE, SPACE_PUSH, SPACE_REFUSED],
        '--space-requirement': [SPACE_PUSH, SPACE_REFUSED],
        '--merge': [LORA_MERGE, 'test_merge_of_a_whole_model_and_a_lora_checkpoint_elsewhere_are_'
                    'one_line'],
    },
    'evaluate.py': {
        '--checkpoint': [EVALUATE, SAME_AS_SAMPLE, OWN_SAMPLERS, LABELS],
        '--prompts-file': [EVALUATE, EVALUATE_FLAGS],
        '--reference-set': [EVALUATE],
        '--image-column': [EVALUATE_ERRORS],
        '--dataset-split': [EVALUATE_ERRORS],
        '--features': [EVALUATE, 'test_inception_features_with_weights_written_locally'],
        '--inception-weights': ['test_inception_features_with_weights_written_locally',
                                EVALUATE_ERRORS],
        '--reference-cache': [EVALUATE_ERRORS],
        '--output-dir': [EVALUATE],
        '--wandb-project': ['test_wandb_gets_the_images_as_a_table_of_prompt_and_seed_rows'],
        '--num-gpus': ['test_an_interrupted_run_resumes_on_two_processes_keeping_what_was_made'],
        '--num-nodes': ['test_evaluate_asks_fabric_for_the_nodes_and_processes_of_its_flags'],
        '--num-workers': [EVALUATE_FLAGS],
        '--cloob-checkpoint': [SAME_AS_SAMPLE, EVALUATE_ERRORS],
        '--autoencoder': [SAME_AS_SAMPLE, EVALUATE_ERRORS],
        '--base-channels': [EVALUATE_ERRORS],
        '--channel-multipliers': [EVALUATE_ERRORS],
        '--cond-scale': [EVALUATE_FLAGS],
        '--device': [EVALUATE_FLAGS],
        '--eta': [EVALUATE_FLAGS, EVALUATE_ERRORS],
        '--method': [SAME_AS_SAMPLE],
        '-n': [SAME_AS_SAMPLE,
               'test_one_grid_per_prompt_a_column_per_checkpoint_and_a_row_per_seed'],
        '--seed': [EVALUATE_FLAGS],
        '--steps': [SAME_AS_SAMPLE, OWN_SAMPLERS],
        '--schedule': [EVALUATE_FLAGS],
        '--autoencoder-scale': [EVALUATE_FLAGS],
        '--size': [SAME_AS_SAMPLE, 'test_checkpoints_that_sample_at_other_sizes_need_size',
                   'test_a_size_that_is_not_square_reaches_the_images_grids_report_and_'
                   'reference_set'],
        '--batch-size': [EVALUATE_FLAGS],
        '--lora': ['test_evaluate_py_lora_gives_the_images_of_sample_py_lora'],
    },
    'distill.py': {
        **{flag: [DISTILL] for flag in SHARED},
        '--teacher': [DISTILL, STUDENTS, HUB_FLAGS],
        '--train-latents': [DISTILL, INTERRUPTED],
        '--guidance-range': [DISTILL, 'test_continuing_with_another_teacher_or_range_is_refused'],
        '--start-steps': [INTERRUPTED, DISTILL_ERRORS],
        '--target-steps': [INTERRUPTED],
        '--round-steps': [DISTILL],
        '--loss-weighting': [DISTILL],
        '--autoencoder-scale': [DISTILL],
        '--vqgan-model': [DISTILL, DISTILL_ERRORS],
        '--cloob-checkpoint': [DISTILL],
        '--output-dir': [DISTILL, STUDENTS],
        '--resume-from': [INTERRUPTED],
        '--peak-tflops': [DISTILL],
        '--demo-prompts': [DISTILL, 'test_the_demo_grids_are_drawn_by_each_student_in_its_own_'
                           'steps'],
        '--demo-every': [DISTILL],
        '--demo-steps': [DISTILL, 'test_the_demo_grids_are_drawn_by_each_student_in_its_own_'
                         'steps'],
        '--demo-method': [DISTILL],
        '--demo-schedule': [DISTILL],
        '--demo-size': [DISTILL],
        '--compile': [DISTILL],
        '--channels-last': [DISTILL],
        '--tf32': [DISTILL],
        '--gradient-checkpointing': [DISTILL],
        '--text-prob': ['test_distill_conditions_as_its_teacher_was_trained_unless_told'],
    },
    'train_autoencoder.py': {
        **{flag: [AUTOENCODER] for flag in SHARED},
        '--vqgan-model': [AUTOENCODER, DECODER_ONLY],
        '--output-name': [AUTOENCODER, DECODER_ONLY],
        # The default, named: no run can tell it from its absence; AUTOENCODER checks that
        # it trains the decoder alone.
        '--decoder-only': [AUTOENCODER],
        '--full': [FULL, AE_SIGTERM],
        '--train-set': [AUTOENCODER, 'test_a_non_finite_step_is_skipped_and_counted_on_tar_'
                        'shards'],
        '--image-column': [TABLE],
        '--dataset-split': [TABLE],
        '--image-size': [AUTOENCODER, VALIDATION],
        '--random-flip': [AUTOENCODER],
        '--kl-weight': [AUTOENCODER],
        '--disc-start': [AUTOENCODER, DISC],
        '--disc-weight': [AUTOENCODER],
        '--perceptual-weight': [AUTOENCODER, LPIPS_OFFLINE],
        '--lpips-weights': [AUTOENCODER, LPIPS_OFFLINE],
        '--val-set': [AUTOENCODER, VALIDATION],
        '--val-every': [AUTOENCODER, VALIDATION],
        '--val-images': [AUTOENCODER],
        '--accumulate-grad-batches': [AUTOENCODER, DISC],
        '--max-steps': [AUTOENCODER, DECODER_ONLY],
        '--resume-from': [AE_SIGTERM],
    },
}


APP_FLAGS = 'test_the_sampling_flags_are_the_forms_defaults_and_a_job_samples_as_sample_py_with_them'
APP_ACCESS = 'test_the_page_binds_127_0_0_1_and_all_interfaces_only_with_a_password_or_when_told'
APP_BAD = 'test_a_bad_request_is_one_line_on_the_page_and_the_server_keeps_serving'
APP_BROWSER = 'test_in_a_real_browser_generate_gives_sample_pys_image_and_png_info_fills_the_form'
COVERED['app.py'] = {
    '--checkpoint': ['test_the_page_needs_no_frozen_model_flags_for_a_training_checkpoint',
                     'test_the_page_gives_sample_pys_images'],
    **{flag: [APP_FLAGS] for flag in (
        '--cloob-checkpoint', '--autoencoder', '--base-channels', '--channel-multipliers',
        '--cond-scale', '--device', '--eta', '--autoencoder-scale', '--size', '--batch-size',
        '--schedule')},
    **{flag: [APP_FLAGS, APP_BROWSER] for flag in ('--method', '-n', '--seed', '--steps')},
    '--lora': ['test_the_page_gives_sample_pys_images'],
    '--port': ['test_port_is_the_one_given_or_the_first_free_one_from_7860',
               'test_a_port_no_socket_takes_exits_2_in_one_line'],
    '--listen': [APP_ACCESS, 'test_listen_without_a_password_exits_2_in_one_line'],
    '--auth': [APP_ACCESS],
    '--auth-file': [APP_ACCESS],
    '--insecure-no-auth': [APP_ACCESS],
    '--max-images': [APP_BAD],
    '--max-size': [APP_BAD],
    '--max-steps': [APP_BAD],
    '--max-upload-mb': ['test_an_upload_over_max_upload_mb_is_refused'],
    '--share-dir': ['test_a_text_prompt_gives_sample_pys_images_and_metadata_plus_a1111_parameters'],
}


def flags(parser):
    return [action.option_strings[0] if action.option_strings else action.dest
            for action in parser._actions if action.dest != 'help']


def test_every_command_line_tool_is_in_the_table():
    tools = {path.name for path in ROOT.glob('*.py') if 'cli.run(main' in path.read_text()}
    assert tools == COVERED.keys() == TOOLS.keys()


@pytest.mark.parametrize('tool', TOOLS)
def test_every_flag_has_a_test_and_the_table_names_no_other(tool):
    assert sorted(flags(TOOLS[tool].parser())) == sorted(COVERED[tool])


def test_every_test_the_table_names_exists():
    tests = {node.name for path in TESTS.glob('test_*.py')
             for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}
    named = {test for tool in COVERED.values() for names in tool.values() for test in names}
    assert sorted(named - tests) == []
    assert all(names for tool in COVERED.values() for names in tool.values())
